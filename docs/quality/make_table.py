"""Markdown table of docs/quality/*.json (written by `ctsliceinterp evaluate --json`), for docs/quality.md.

    python docs/quality/make_table.py docs/quality/ricord_ddim20.json docs/quality/ricord_dpmpp8.json ...

The diffusion rows are labelled with the sampler and steps taken from each file's command line.
"""

import json
import shlex
import sys


def label(method: str, command: str) -> str:
    if method != "diffusion":
        return method
    args = shlex.split(command)
    value = lambda flag: args[args.index(flag) + 1] if flag in args else "model default"  # noqa: E731
    return f"model ({value('--sampler')}, {value('--steps')} steps)"


def main(paths) -> int:
    print("| case | method | PSNR (dB) | SSIM | PSNR 40/400 (dB) | PSNR body (dB) | thick MAE (HU) | time (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    seen = set()
    for path in paths:
        data = json.load(open(path))
        case = data["case"]["name"]
        for method, r in data["methods"].items():
            key = (case, label(method, data.get("command", "")))
            if key in seen:
                continue
            seen.add(key)
            print(f"| {case} | {key[1]} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['psnr_soft_tissue']:.2f} | "
                  f"{r['psnr_body']:.2f} | {r['consistency_mae_hu']:.2f} | {r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
