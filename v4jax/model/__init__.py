"""Model assembly: decoder block, MTP block, the whole transformer."""
