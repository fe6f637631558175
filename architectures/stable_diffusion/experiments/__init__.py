"""The guidance and sampler experiment of notes/stable-diffusion.md, with the digit classifier that judges it."""
