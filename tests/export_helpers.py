"""What the adapt/export/predict tests build on: a small meta-learner, a support folder of mixed image sizes and
modes, and encoded image files (the fixtures of conftest.py make them once per test module)."""

from pathlib import Path

import numpy as np
from PIL import Image

N_WAY, SHAPE = 5, (28, 28, 1)
CLASSES = ["zeta", "alpha", "gamma", "delta", "beta"]  # folder order != sorted order on purpose


def random_image(rng, size, mode):
    """A PIL image of random pixels, `size` (H, W), in mode L, RGB, RGBA or P (a palette of RGB's colours)."""
    channels = {"L": None, "RGB": 3, "RGBA": 4, "P": 3}[mode]
    shape = size if channels is None else (*size, channels)
    image = Image.fromarray((rng.random(shape) * 255).astype(np.uint8))
    return image.convert(mode)


def write_support(root, classes=CLASSES, shots=2, seed=0):
    """One sub-folder per class with `shots` images of mixed sizes and modes (exercises the conversion rule)."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        for shot in range(shots):
            mode = ("L", "RGB", "RGBA")[(index + shot) % 3]
            random_image(rng, (28 + 4 * shot, 30), mode).save(folder / f"{shot}.png")
    return Path(root)


def write_encoded_files(folder):
    """PNG, JPEG (one with an EXIF orientation) and colour-palette BMP files of other sizes and modes than SHAPE,
    as a client would send them."""
    rng = np.random.default_rng(3)
    files = [
        ((28, 28), "L", ".png"),
        ((40, 33), "RGB", ".png"),
        ((28, 34), "RGB", ".jpg"),
        ((50, 61), "L", ".jpeg"),
        ((30, 26), "P", ".bmp"),  # rows of 26 one-byte indices padded to 28: the file ends in zero bytes
    ]
    paths = []
    for index, (size, mode, suffix) in enumerate(files):
        paths.append(Path(folder) / f"img{index}{suffix}")
        image = random_image(rng, size, mode)
        if suffix == ".jpg":  # a phone's portrait photo: landscape pixels and an orientation tag
            exif = Image.Exif()
            exif[0x0112] = 6
            image.save(paths[-1], exif=exif.tobytes())
        else:
            image.save(paths[-1])
    return paths


def make_meta(n_way=N_WAY, inner_steps=2, seed=0):
    """A MetaLearner around a narrow conv4 (8 filters) for SHAPE images, its weights from `seed`."""
    import keras

    import keras_metalstm as km

    keras.utils.set_random_seed(seed)
    learner = km.learners.conv4(input_shape=SHAPE, num_classes=n_way, filters=8)
    return km.MetaLearner(learner, inner_steps=inner_steps)
