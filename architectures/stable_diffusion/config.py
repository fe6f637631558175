"""Stable Diffusion's configurations: one dataclass per component, read from and written to the
config.json files of a diffusers-format pipeline directory, and the zoo's presets.

A pipeline directory (diffusers' layout) holds `model_index.json` and one folder per component:
`unet/config.json`, `vae/config.json`, `text_encoder/config.json` (a transformers CLIPTextConfig),
`scheduler/scheduler_config.json` and `tokenizer/`. Field names follow those files, so a published
config reads straight in; a setting this implementation does not compute (a different block type,
an extra class embedding, ...) is refused by name rather than silently ignored.

A preset (`SDConfig`) is flat, one number per field, so every field is a command-line option of
the train script; `components(cfg)` expands it to the four component configs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from architectures.utils.config import get_preset

DOWN_CROSS, DOWN_PLAIN = "CrossAttnDownBlock2D", "DownBlock2D"
UP_CROSS, UP_PLAIN = "CrossAttnUpBlock2D", "UpBlock2D"
MID_CROSS = "UNetMidBlock2DCrossAttn"
VAE_DOWN, VAE_UP = "DownEncoderBlock2D", "UpDecoderBlock2D"


@dataclass
class UNetConfig:
    sample_size: int = 8  # latent height and width the U-Net was trained on (informational)
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # predicted-noise channels out
    block_out_channels: tuple = (32, 64)  # channels of each resolution level, finest first
    down_block_types: tuple = (DOWN_CROSS, DOWN_PLAIN)  # per level: with cross-attention or not
    up_block_types: tuple = (UP_PLAIN, UP_CROSS)  # per level, coarsest first
    layers_per_block: int = 1  # ResNet blocks per down level (up levels have one more)
    cross_attention_dim: int = 32  # width of the text encoder's hidden states
    attention_head_dim: int | tuple = 8  # diffusers' name for the NUMBER of heads (per level if a tuple)
    norm_num_groups: int = 32  # GroupNorm groups in every ResNet block and transformer
    norm_eps: float = 1e-5  # GroupNorm epsilon of the ResNet blocks and the output norm
    transformer_layers_per_block: int = 1  # transformer blocks inside each attention
    use_linear_projection: bool = False  # Linear (True) or 1x1 Conv (False) into and out of the transformer
    flip_sin_to_cos: bool = True  # timestep embedding is [cos, sin] (True) or [sin, cos]
    freq_shift: int = 0  # shift of the frequency denominator of the timestep embedding

    def heads(self) -> tuple[int, ...]:
        """Attention heads per level (diffusers reads `attention_head_dim` as the head count)."""
        h = self.attention_head_dim
        return tuple(h) if isinstance(h, (tuple, list)) else (h,) * len(self.block_out_channels)


@dataclass
class VAEConfig:
    in_channels: int = 1  # image channels (3 for RGB)
    out_channels: int = 1  # decoded image channels
    latent_channels: int = 4  # channels of the latent
    block_out_channels: tuple = (32, 64, 64)  # channels per resolution level; each level but the last halves H and W
    layers_per_block: int = 1  # ResNet blocks per encoder level (decoder levels have one more)
    norm_num_groups: int = 32  # GroupNorm groups
    sample_size: int = 32  # image height and width (informational)
    scaling_factor: float = 1.0  # latents are multiplied by this before diffusion (SD 1.x: 0.18215, 1/std of its latents)
    use_quant_conv: bool = True  # a 1x1 conv on the encoder's moments
    use_post_quant_conv: bool = True  # a 1x1 conv on the latent before the decoder
    mid_block_add_attention: bool = True  # self-attention in the mid block of encoder and decoder


@dataclass
class TextConfig:
    vocab_size: int = 600  # tokens in the vocabulary
    hidden_size: int = 32  # width of the residual stream (the U-Net's cross_attention_dim)
    intermediate_size: int = 64  # hidden width of the MLP
    num_hidden_layers: int = 2  # transformer layers
    num_attention_heads: int = 4  # attention heads
    max_position_embeddings: int = 16  # the context: the longest prompt, with its start and end tokens
    hidden_act: str = "quick_gelu"  # MLP activation: "quick_gelu" (CLIP) or "gelu"
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon
    bos_token_id: int = 0  # <|startoftext|>
    eos_token_id: int = 1  # <|endoftext|>, also the padding


@dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000  # T: steps of the forward (noising) process
    beta_start: float = 0.00085  # beta_1
    beta_end: float = 0.012  # beta_T
    beta_schedule: str = "scaled_linear"  # "scaled_linear" (linear in sqrt(beta), SD's) or "linear"
    prediction_type: str = "epsilon"  # what the U-Net predicts: "epsilon" (the noise) or "v_prediction"
    timestep_spacing: str = "leading"  # how N sampling steps are picked from T: "leading", "trailing", "linspace"
    steps_offset: int = 1  # added to every "leading" timestep (SD 1.x: 1)
    set_alpha_to_one: bool = False  # DDIM's last step goes to alpha_bar = 1 (True) or alpha_bar_0 (False)
    clip_sample: bool = False  # clamp the predicted x_0 to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0  # the clamp's bound


# ---------------------------------------------------------------------------- presets


@dataclass
class SDConfig:
    """A whole pipeline's sizes in one flat dataclass: every field is a --option of the train script."""
    image_size: int = 16  # image height and width in pixels
    image_channels: int = 1  # 1 (grey) or 3 (RGB)
    latent_channels: int = 4  # channels of the VAE's latent
    vae_channels: int = 16  # VAE channels at full resolution (x2 below it)
    vae_levels: int = 3  # VAE resolution levels; the latent is image_size / 2**(vae_levels - 1) on a side
    unet_channels: int = 32  # U-Net channels at the latent's resolution (x2 per level below)
    unet_levels: int = 2  # U-Net resolution levels
    unet_heads: int = 4  # attention heads in the U-Net's transformers
    norm_groups: int = 8  # GroupNorm groups in the VAE and the U-Net
    text_hidden: int = 32  # the text encoder's width (= the U-Net's cross_attention_dim)
    text_layers: int = 2  # text encoder layers
    text_heads: int = 4  # text encoder attention heads
    vocab_size: int = 600  # tokenizer vocabulary (set from the trained tokenizer)
    context: int = 8  # the text encoder's context: longest prompt in tokens, start and end included
    prediction_type: str = "epsilon"  # "epsilon" or "v_prediction"


PRESETS: dict[str, SDConfig] = {
    # 16x16 grey digits -> 4x4x4 latents (as many numbers as the 8x8 originals have pixels); a 0.24 M
    # parameter VAE, a 0.79 M parameter U-Net, a 0.04 M parameter text encoder
    "tiny": SDConfig(),
}


def preset(name: str) -> SDConfig:
    return get_preset(PRESETS, name, "stable_diffusion")


def components(cfg: SDConfig) -> tuple[UNetConfig, VAEConfig, TextConfig, SchedulerConfig]:
    """The four component configs of a preset."""
    for name in ("image_size", "image_channels", "latent_channels", "vae_channels", "vae_levels", "unet_channels",
                 "unet_levels", "unet_heads", "norm_groups", "text_hidden", "text_layers", "text_heads", "vocab_size",
                 "context"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.image_size % 2 ** (cfg.vae_levels - 1 + cfg.unet_levels - 1):
        raise ValueError(f"--image-size {cfg.image_size} must be divisible by 2**(vae_levels - 1 + unet_levels - 1) = "
                         f"{2 ** (cfg.vae_levels - 1 + cfg.unet_levels - 1)}: every level halves it")
    vae_channels = tuple(cfg.vae_channels * min(2 ** i, 2) for i in range(cfg.vae_levels))
    unet_channels = tuple(cfg.unet_channels * 2 ** i for i in range(cfg.unet_levels))
    for c in (*vae_channels, *unet_channels):
        if c % cfg.norm_groups:
            raise ValueError(f"--norm-groups {cfg.norm_groups} must divide every block's channels {c}")
    latent_size = cfg.image_size // 2 ** (cfg.vae_levels - 1)
    down = tuple(DOWN_CROSS if i < cfg.unet_levels - 1 else DOWN_PLAIN for i in range(cfg.unet_levels))
    up = tuple(UP_PLAIN if i == 0 else UP_CROSS for i in range(cfg.unet_levels))
    if cfg.unet_levels == 1:
        down, up = (DOWN_CROSS,), (UP_CROSS,)
    unet = UNetConfig(sample_size=latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
                      block_out_channels=unet_channels, down_block_types=down, up_block_types=up,
                      cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.unet_heads,
                      norm_num_groups=cfg.norm_groups)
    vae = VAEConfig(in_channels=cfg.image_channels, out_channels=cfg.image_channels,
                    latent_channels=cfg.latent_channels, block_out_channels=vae_channels,
                    norm_num_groups=cfg.norm_groups, sample_size=cfg.image_size)
    text = TextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden,
                      num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                      max_position_embeddings=cfg.context)
    # "trailing" spacing starts every sampler at the noisiest step, t = T - 1, and lets DDPM take all T steps
    sched = SchedulerConfig(prediction_type=cfg.prediction_type, timestep_spacing="trailing", steps_offset=0)
    return unet, vae, text, sched


# ---------------------------------------------------------------------------- config.json files


def read_fields(cls, d: dict, where: str, defaults_required: dict | None = None):
    """The dataclass `cls` from a component's config.json: its known keys are read (lists become
    tuples); `defaults_required` maps keys this implementation does not compute to the only value
    it accepts (a file that sets another is refused, naming the key)."""
    for key, allowed in (defaults_required or {}).items():
        if key in d and d[key] not in allowed:
            raise ValueError(f"{where}: {key}={d[key]!r} is not supported here (supported: "
                             f"{', '.join(repr(a) for a in allowed)})")
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
    return cls(**kw)


UNET_FIXED = {"act_fn": ("silu",), "center_input_sample": (False,), "class_embed_type": (None,),
              "addition_embed_type": (None,), "encoder_hid_dim": (None,), "num_class_embeds": (None,),
              "time_cond_proj_dim": (None,), "only_cross_attention": (False, [False]), "dual_cross_attention": (False,),
              "upcast_attention": (False, None), "resnet_time_scale_shift": ("default",), "num_attention_heads": (None,),
              "time_embedding_type": ("positional",), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
              "mid_block_type": (MID_CROSS,), "downsample_padding": (1,), "mid_block_scale_factor": (1, 1.0),
              "attention_type": ("default",), "reverse_transformer_layers_per_block": (None,)}
VAE_FIXED = {"act_fn": ("silu",), "force_upcast": (True, False), "shift_factor": (None, 0, 0.0),
             "latents_mean": (None,), "latents_std": (None,)}
SCHEDULER_FIXED = {"trained_betas": (None,), "thresholding": (False,), "rescale_betas_zero_snr": (False,),
                   "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
                   "interpolation_type": ("linear",), "timestep_type": ("discrete",), "final_sigmas_type": ("zero",),
                   "variance_type": ("fixed_small",), "sigma_min": (None,), "sigma_max": (None,)}


def unet_from_dict(d: dict, where: str) -> UNetConfig:
    cfg = read_fields(UNetConfig, d, where, UNET_FIXED)
    for kinds, allowed in ((cfg.down_block_types, (DOWN_CROSS, DOWN_PLAIN)), (cfg.up_block_types, (UP_CROSS, UP_PLAIN))):
        bad = [k for k in kinds if k not in allowed]
        if bad:
            raise ValueError(f"{where}: block types {bad} are not supported here (supported: {', '.join(allowed)})")
    if not isinstance(cfg.transformer_layers_per_block, int):
        raise ValueError(f"{where}: transformer_layers_per_block must be one number here, "
                         f"got {cfg.transformer_layers_per_block!r}")
    if isinstance(cfg.layers_per_block, (tuple, list)) or isinstance(cfg.cross_attention_dim, (tuple, list)):
        raise ValueError(f"{where}: layers_per_block and cross_attention_dim must be one number each here")
    return cfg


def vae_from_dict(d: dict, where: str) -> VAEConfig:
    cfg = read_fields(VAEConfig, d, where, VAE_FIXED)
    for key, kinds, want in (("down_block_types", d.get("down_block_types", ()), VAE_DOWN),
                             ("up_block_types", d.get("up_block_types", ()), VAE_UP)):
        if any(k != want for k in kinds):
            raise ValueError(f"{where}: {key} {kinds} are not supported here (only {want})")
    return cfg


def text_from_dict(d: dict, where: str) -> TextConfig:
    if d.get("model_type", "clip_text_model") != "clip_text_model":
        raise ValueError(f"{where}: model_type={d.get('model_type')!r}, expected a CLIP text encoder ('clip_text_model')")
    cfg = read_fields(TextConfig, d, where)
    if cfg.hidden_act not in ("quick_gelu", "gelu"):
        raise ValueError(f"{where}: hidden_act={cfg.hidden_act!r} is not supported here (quick_gelu or gelu)")
    return cfg


def scheduler_from_dict(d: dict, where: str) -> SchedulerConfig:
    cfg = read_fields(SchedulerConfig, d, where, SCHEDULER_FIXED)
    checks = (("beta_schedule", ("scaled_linear", "linear")), ("prediction_type", ("epsilon", "v_prediction")),
              ("timestep_spacing", ("leading", "trailing", "linspace")))
    for key, allowed in checks:
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{where}: {key}={getattr(cfg, key)!r} is not supported (use one of {allowed})")
    return cfg


def to_dict(cfg, **extra) -> dict:
    """A component's config.json contents: its fields (tuples as lists) plus `extra` (_class_name, ...)."""
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    return {**extra, **d}
