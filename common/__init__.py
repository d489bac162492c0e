"""Small helpers every part of the pack uses: atomic files, file signatures, figures as images,
the pack's version. Knows nothing of faces, training or ComfyUI."""
