"""Write proxy-task frames with their questions: for the demo and the ROS example
(``python -m ptp_ros.proxy.demo OUT_DIR [--count N]``: JPEG + questions.json), or as a labelled frame set in
``ptp-eval --data``'s format (``--jsonl``: lossless PNG + data.jsonl, the pixels ``ptp-eval`` scores)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2

from .scenes import make_questions, make_scene, split_seed


def write_demo_frames(out_dir: str | Path, count: int = 4, split: str = "test", start: int = 0) -> list[Path]:
    """``count`` scenes as JPEG (quality 95) plus ``questions.json`` (per frame: questions, answers,
    objects with their pixel boxes); returns the image paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, manifest = [], []
    for k in range(start, start + count):
        scene = make_scene(split_seed(split, k))
        path = out / f"proxy_{split}_{k:04d}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        paths.append(path)
        manifest.append(
            {
                "image": path.name,
                "seed": scene.seed,
                "objects": [
                    {"shape": o.shape, "colour": o.colour, "box": [round(v, 1) for v in o.box]} for o in scene.objects
                ],
                "questions": [{"text": q.text, "answer": q.answer, "type": q.qtype} for q in make_questions(scene)],
            }
        )
    (out / "questions.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return paths


def write_jsonl(
    out_dir: str | Path,
    count: int = 4,
    split: str = "test",
    start: int = 0,
    per_type: int = 2,
    jpeg_quality: int | None = None,
) -> Path:
    """``count`` scenes under ``images/`` plus ``data.jsonl``: one line per question, with the fields
    ``ptp-eval --data`` reads (id, image relative to the file, question, answers, type), the questions
    ``ptp-eval`` asks of the same scenes with the same ``per_type``.  PNG (the exact pixels ``ptp-eval``
    scores) unless ``jpeg_quality`` is given (smaller files, for a bundled set).  Returns the JSONL path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(start, start + count):
        scene = make_scene(split_seed(split, k))
        name = f"images/proxy_{split}_{k:04d}.{'png' if jpeg_quality is None else 'jpg'}"
        params = [] if jpeg_quality is None else [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
        cv2.imwrite(str(out / name), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR), params)
        lines += [
            json.dumps(
                {
                    "id": f"{split}-{k:04d}-{i}",
                    "image": name,
                    "question": q.text,
                    "answers": [q.answer],
                    "type": q.qtype,
                }
            )
            for i, q in enumerate(make_questions(scene, per_type))
        ]
    data = out / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m ptp_ros.proxy.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--split", default="test", choices=("train", "val", "test"))
    ap.add_argument("--start", type=int, default=0, help="first scene index of the split")
    ap.add_argument("--jsonl", action="store_true", help="write PNG frames and data.jsonl for ptp-eval --data")
    ap.add_argument("--per-type", type=int, default=2, help="with --jsonl: questions of each type per scene")
    ap.add_argument("--jpeg-quality", type=int, default=None, help="with --jsonl: JPEG frames instead of PNG")
    args = ap.parse_args(argv)
    if args.jsonl:
        print(write_jsonl(args.out, args.count, args.split, args.start, args.per_type, args.jpeg_quality))
        return
    for path in write_demo_frames(args.out, args.count, args.split, args.start):
        print(path)


if __name__ == "__main__":
    main()
