"""dicom-relay: a DICOM relay (PACS proxy)."""

__version__ = "0.1.0"
