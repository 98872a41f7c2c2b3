"""Episodic few-shot data: class-indexed data sets, loaders, the built-in fontglot set and the episode pipeline.

from keras_metalstm.data import load_dataset, episode_dataset
splits = load_dataset("fontglot")                         # or omniglot / miniimagenet / folder + data_dir
batches = episode_dataset(splits.train, n_way=5, k_shot=1, q_query=15, batch_size=4, seed=0)
"""

from keras_metalstm.data.dataset import (
    DEFAULT_SPLIT_FRACTIONS,
    ClassIndexedDataset,
    DatasetSplits,
    read_split_file,
    seeded_order,
    split_classes,
    split_file_text,
    write_split_file,
)
from keras_metalstm.data.episodes import EPISODE_KEYS, EpisodeSampler, episode_dataset
from keras_metalstm.data.errors import DataError
from keras_metalstm.data.fashion_mnist import load_fashion_mnist
from keras_metalstm.data.folder import IMAGE_EXTENSIONS, image_files, image_folder_splits, load_image_folder
from keras_metalstm.data.fontglot import (
    FONTGLOT_SPLIT_SEED,
    fontglot_path,
    fontglot_splits,
    load_fontglot,
)
from keras_metalstm.data.images import (
    CONVERSION_RULE,
    convert_dataset,
    convert_images,
    decode_image_bytes,
    decode_image_files,
)
from keras_metalstm.data.miniimagenet import load_miniimagenet
from keras_metalstm.data.omniglot import load_omniglot, omniglot_splits
from keras_metalstm.data.progress import reading_progress
from keras_metalstm.data.registry import DATASET_NAMES, dataset_options, load_dataset

__all__ = [
    "CONVERSION_RULE",
    "DATASET_NAMES",
    "DEFAULT_SPLIT_FRACTIONS",
    "EPISODE_KEYS",
    "FONTGLOT_SPLIT_SEED",
    "IMAGE_EXTENSIONS",
    "ClassIndexedDataset",
    "DataError",
    "DatasetSplits",
    "EpisodeSampler",
    "convert_dataset",
    "convert_images",
    "dataset_options",
    "decode_image_bytes",
    "decode_image_files",
    "episode_dataset",
    "fontglot_path",
    "fontglot_splits",
    "image_files",
    "image_folder_splits",
    "load_dataset",
    "load_fashion_mnist",
    "load_fontglot",
    "load_image_folder",
    "load_miniimagenet",
    "load_omniglot",
    "omniglot_splits",
    "read_split_file",
    "reading_progress",
    "seeded_order",
    "split_classes",
    "split_file_text",
    "write_split_file",
]
