"""Write a few proxy-task frames with their questions, for the demo and the ROS example:
``python -m ptp_ros.proxy.demo OUT_DIR [--count N]``."""
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
        manifest.append({"image": path.name, "seed": scene.seed,
                         "objects": [{"shape": o.shape, "colour": o.colour, "box": [round(v, 1) for v in o.box]}
                                     for o in scene.objects],
                         "questions": [{"text": q.text, "answer": q.answer, "type": q.qtype}
                                       for q in make_questions(scene)]})
    (out / "questions.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--split", default="test", choices=("train", "val", "test"))
    args = ap.parse_args(argv)
    for path in write_demo_frames(args.out, args.count, args.split):
        print(path)


if __name__ == "__main__":
    main()
