"""Reimplemented mixture-search methods, one file each, behind fastmix.optimizer's protocol."""
