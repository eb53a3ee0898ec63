"""menseg: data-efficient 3D meningioma segmentation from multi-modal MRI."""

__version__ = "0.1.0"
