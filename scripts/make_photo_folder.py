"""Write a folder of large JPEG photos, offline, for the ``imagefolder-224`` preset.

Random crops (scale, aspect, flip, brightness) of the two photographs scikit-learn ships
(``load_sample_images``: china.jpg and flower.jpg, 640x427), saved at 256-640 px in class
sub-folders ``china/`` and ``flower/``. Real photo statistics, no download.

Usage: ``.venv/bin/python scripts/make_photo_folder.py OUT_DIR [--count 300] [--seed 0]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance
from sklearn.datasets import load_sample_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    sample = load_sample_images()
    photos = {
        Path(f).stem: Image.fromarray(a)
        for f, a in zip(sample.filenames, sample.images, strict=True)
    }
    for i in range(args.count):
        name = list(photos)[i % len(photos)]
        photo = photos[name]
        w, h = photo.size
        cw = int(w * rng.uniform(0.35, 1.0))
        ch = min(h, int(cw * rng.uniform(0.6, 1.0)))
        left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        crop = photo.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.7, 1.3))
        side = int(rng.integers(256, 641))
        crop = crop.resize((side, int(side * ch / cw)), Image.Resampling.BICUBIC)
        folder = args.out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{name}-{i:04d}.jpg", quality=90)
    print(f"wrote {args.count} photos to {args.out_dir}")


if __name__ == "__main__":
    main()
