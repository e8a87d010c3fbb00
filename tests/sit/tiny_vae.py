"""A tiny diffusers AutoencoderKL saved to a folder (random weights, downsampling factor 2): no download."""
import torch


def save_tiny_vae(path) -> str:
    """Write the VAE to path (save_pretrained) and return path as a string."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4)
    vae.save_pretrained(path)
    return str(path)
