"""Offline preprocessing (tools/preprocess_data.py): input formats -> samples -> packed rows on disk."""
