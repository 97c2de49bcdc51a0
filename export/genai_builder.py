"""Run the onnxruntime-genai model builder under transformers 4.57.

onnxruntime-genai 0.18's builder targets transformers 5: it imports model classes 4.57
lacks and expects ``config.rope_scaling`` to be absent or a dict (4.57 sets ``None``).
This entry point fills both gaps, then runs the builder's own command line:

    python -m loraship.export.genai_builder -i MODEL -o OUT -p int4 -e cpu -c CACHE
"""

from __future__ import annotations

import runpy
import sys

# Classes the builder imports by name; only used to recognise those architectures.
_MISSING_CLASSES = (
    "Gemma3ForConditionalGeneration",
    "Lfm2VlForConditionalGeneration",
    "Mistral3ForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
    "Qwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForConditionalGeneration",
)


def patch_transformers() -> None:
    """Give transformers 4.57 what the builder expects from 5.x."""
    import transformers

    known = set(dir(transformers))
    for name in _MISSING_CLASSES:
        if name not in known:  # placeholders: isinstance checks against them are simply False
            transformers._objects[name] = type(name, (), {})
    original = transformers.AutoConfig.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        config = original(cls, *args, **kwargs)
        if getattr(config, "rope_scaling", {}) is None:
            config.rope_scaling = {}
        return config

    transformers.AutoConfig.from_pretrained = classmethod(from_pretrained)


def main(argv: list[str]) -> None:
    patch_transformers()
    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
