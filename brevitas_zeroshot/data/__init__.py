from ._folder import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS
from ._folder import ImageFolderDataset as ImageFolderDataset
from ._folder import create_eval_transform as create_eval_transform
from ._folder import create_loader as create_loader
from ._folder import open_image_folder as open_image_folder

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "create_eval_transform", "create_loader", "open_image_folder"]
