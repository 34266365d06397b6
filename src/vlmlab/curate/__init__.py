"""`vlmlab curate`: judge the content of LLaVA JSON, drop duplicates, report why.

One streaming pass runs the content filters (one registered class per file in `filters/`) and
spools what passes; the duplicate stages then work on compact per-entry keys (hashes, 64-bit
perceptual hashes, embeddings), so a 665K-entry file is never held whole in memory. Every
decision is a function of the set of entries (representatives are the smallest key), not of
their order or the number of workers.
"""
