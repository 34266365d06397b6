"""Text conventions shared by `models` and `data`: special tokens, the label ignore value, and
chat templates (`vlmlab.text.templates`).

Why a package of its own: the model side (HF export, the `<image>` token) and the data side
(tokenising, masking) both need these, and neither may import the other. This package imports
nothing from vlmlab but `errors`, and no heavy library at import time.
"""

from __future__ import annotations

# The tokenizer's special token that stands for one image embedding (transformers Llava's
# convention); build_tokenizer adds it and the text side repeats it once per embedding.
IMAGE_TOKEN = "<image>"
# Where a conversation's text puts its image (LLaVA JSON `<image>`), before expansion.
IMAGE_PLACEHOLDER = "<image>"
# Label value of positions that are not trained on (PyTorch cross-entropy's ignore_index).
IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "IMAGE_PLACEHOLDER", "IMAGE_TOKEN"]
