"""What the scripts read and write: image folders, latents, sinusoids, IDX, resumable streams, sample npz files."""
