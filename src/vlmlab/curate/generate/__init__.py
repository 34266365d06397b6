"""`vlmlab generate`: LLaVA's data generation (captions and boxes -> a text-only LLM -> LLaVA JSON).

One request per (entry, prompt type) goes to an OpenAI-compatible endpoint or a local
transformers model, through a disk cache; each answer is parsed, judged by curate's filters and
appended (fsync) to a journal, so a killed run resumes where it stopped, and the LLaVA JSON is
written atomically at the end.
"""
