"""Build the bundled tiny tokenizer: a real byte-level BPE trained on the synthetic corpus.

Run `python -m vlmlab.data.tiny_tokenizer` to regenerate `vlmlab/assets/tiny_tokenizer`.
It behaves like a Llama tokenizer where it matters for masking: `<s>` BOS added, `</s>` EOS.
"""

from __future__ import annotations

from pathlib import Path

from vlmlab.data.shapes import corpus_text
from vlmlab.text.templates.vicuna_v1 import VicunaV1Template

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def build(vocab_size: int = 512) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [
        *corpus_text(),
        VicunaV1Template.system,
        "USER: ASSISTANT:",
        "Answer the question using a single word or phrase.",
    ]
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", tokenizer.token_to_id("<s>"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "assets" / "tiny_tokenizer"
    build().save_pretrained(out)  # type: ignore[attr-defined]
    print(out)


if __name__ == "__main__":
    main()
