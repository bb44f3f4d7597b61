"""UNet++ segmentation pipeline for CT and MRI built on MONAI."""

__version__ = "0.1.0"
