"""Readers for each file format a lab archive holds; `open_volume` picks one."""
