"""Content filters, one registered class per file (see `base`); `FILTERS.discover()` finds them."""

from __future__ import annotations

from vlmlab.curate.filters.base import FILTERS, Filter, NotJudged, Verdict

__all__ = ["FILTERS", "Filter", "NotJudged", "Verdict"]
