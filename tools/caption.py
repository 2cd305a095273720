#!/usr/bin/env python
"""Caption images with an exported GenLIP folder (tools/convert_checkpoint.py), greedy decoding.

Uses only ``transformers`` and the code shipped in the folder (``trust_remote_code``), never the trainer:
    python tools/caption.py --model exports/tiny-hf --image a.png b.jpg
Prints one "FILE<TAB>caption" line per image (newlines, tabs and carriage returns inside a generated caption are
written as \\n, \\t and \\r, so every image stays on one line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ONE_LINE = str.maketrans({"\n": "\\n", "\t": "\\t", "\r": "\\r"})


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, metavar="HF_DIR", help="exported Hugging Face folder (full model)")
    ap.add_argument("--image", required=True, nargs="+", metavar="FILE", help="image file(s) to caption")
    ap.add_argument("--prompt", default=None,
                    help="user prompt before the caption (default: the training prompt stored in the folder)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="generation limit per caption (default 64)")
    ap.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                    help="compute dtype (default: the dtype the weights were exported in)")
    ap.add_argument("--ids", action="store_true", help="also print the generated token ids")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        print(f"error: {folder / 'config.json'} is missing (not an exported GenLIP folder)", file=sys.stderr)
        return 2
    if json.loads((folder / "config.json").read_text()).get("vision_only"):
        print(f"error: {folder} is a --vision-only export (no LM head); export the full model to caption",
              file=sys.stderr)
        return 2
    dtype = {"auto": "auto", "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    processor = get_class_from_dynamic_module("image_processing_genlip.GenLIPImageProcessor", str(folder))
    processor = processor.from_pretrained(folder)
    prompt = args.prompt
    if prompt is None:
        prompt = json.loads((folder / "special_tokens.json").read_text()).get("prompt", "Describe the image in detail.")
    prompt_ids = tokenizer(prompt.strip(), add_special_tokens=False, return_tensors="pt").input_ids
    status = 0
    for path in args.image:
        try:
            with Image.open(path) as image:
                inputs = processor([image])
        except Exception as e:  # noqa: BLE001 - report and go on with the other images
            print(f"{path}\tERROR: cannot read image: {e}", file=sys.stderr)
            status = 1
            continue
        ids = model.generate(inputs["pixel_values"], inputs["image_grid_thw"], prompt_ids,
                             max_new_tokens=args.max_new_tokens)[0].tolist()
        text = tokenizer.decode(ids).translate(ONE_LINE)  # one line per image, tab-separated, whatever was generated
        print(f"{path}\t{text}" + (f"\t{ids}" if args.ids else ""), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
