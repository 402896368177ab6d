"""Test-only stand-in for the parts of `sgm` (Stability-AI/generative-models @ 45c443b) that A1111 loads for SDXL.

There is no `sgm` package on PyPI, so this module rebuilds sgm's SDXL module tree from ldm's building blocks
(stable-diffusion-sdkit's ResBlock/Downsample/Upsample/SpatialTransformer have the same names and forward).
The names are not trusted to this file: tests/test_models.py compares the state-dict keys and shapes with
skeletons dumped from the real sgm code (tests/data/sdxl_*unet_skeleton.json).

Only the configuration space SDXL uses is supported; anything else raises instead of building a wrong tree.
"""
import torch
from einops import rearrange
from torch import nn

from ldm.modules.attention import SpatialTransformer as LdmSpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, TimestepEmbedSequential, Upsample
from ldm.modules.diffusionmodules.util import conv_nd, linear, normalization, timestep_embedding, zero_module
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder

# configs/inference/sd_xl_base.yaml, network_config.params (use_checkpoint off, plain softmax attention).
SDXL_BASE_UNET_CONFIG = dict(
    adm_in_channels=2816, num_classes="sequential", use_checkpoint=False, in_channels=4, out_channels=4,
    model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4],
    num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True,
    transformer_depth=[1, 2, 10], context_dim=2048, spatial_transformer_attn_type="softmax", legacy=False,
)

# Same structure and block names, small widths. Depth 2 at levels 1/2 and the middle keeps
# `transformer_blocks.1` in every attention block; context 2048 and adm 2816 keep SDXL's conditioning shapes.
TINY_SDXL_UNET_CONFIG = dict(SDXL_BASE_UNET_CONFIG, model_channels=32, num_head_channels=16,
                             transformer_depth=[1, 2, 2])


class SpatialTransformer(LdmSpatialTransformer):
    """ldm's SpatialTransformer (same parameters) with sgm's forward: one context shared by all blocks. The class
    name is sgm's own: trainers (kohya's and ours) find the attention layers to train by it."""

    def forward(self, x, context=None):
        if not isinstance(context, list):
            context = [context]
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = rearrange(x, "b c h w -> b (h w) c").contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, context=context[0 if len(context) == 1 else i])
        if self.use_linear:
            x = self.proj_out(x)
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class UNetModel(nn.Module):
    """sgm.modules.diffusionmodules.openaimodel.UNetModel, restricted to what SDXL configs use."""

    def __init__(self, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, num_classes=None,
                 use_checkpoint=False, num_heads=-1, num_head_channels=-1, use_spatial_transformer=False,
                 transformer_depth=1, context_dim=None, legacy=True, use_linear_in_transformer=False,
                 spatial_transformer_attn_type="softmax", adm_in_channels=None, transformer_depth_middle=None):
        super().__init__()
        if not use_spatial_transformer or context_dim is None:
            raise NotImplementedError("sgm_like.UNetModel only builds cross-attention (SpatialTransformer) UNets")
        if num_classes not in (None, "sequential"):
            raise NotImplementedError(f"sgm_like.UNetModel: num_classes={num_classes!r} is not supported")
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError("set exactly one of num_heads / num_head_channels")
        if isinstance(transformer_depth, int):
            transformer_depth = len(channel_mult) * [transformer_depth]
        transformer_depth = list(transformer_depth)
        if transformer_depth_middle is None:
            transformer_depth_middle = transformer_depth[-1]
        if isinstance(num_res_blocks, int):
            num_res_blocks = len(channel_mult) * [num_res_blocks]

        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = list(num_res_blocks)
        self.attention_resolutions = attention_resolutions
        self.channel_mult = channel_mult
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.predict_codebook_ids = False

        def heads_for(ch):
            if num_head_channels == -1:
                n, d = num_heads, ch // num_heads
            else:
                n, d = ch // num_head_channels, num_head_channels
            if legacy:
                d = ch // n
            if n <= 0 or d <= 0:
                raise ValueError(f"channel width {ch} gives {n} heads of {d} channels")
            return n, d

        def transformer(ch, depth):
            n, d = heads_for(ch)
            # ldm's SpatialTransformer indexes context_dim per block; sgm repeats a single value the same way.
            return SpatialTransformer(ch, n, d, depth=depth, context_dim=[context_dim] * depth,
                                      use_linear=use_linear_in_transformer, use_checkpoint=use_checkpoint)

        def resblock(ch, out_ch=None):
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch, dims=dims, use_checkpoint=use_checkpoint)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, time_embed_dim), nn.SiLU(),
                                        linear(time_embed_dim, time_embed_dim))
        if num_classes == "sequential":
            if adm_in_channels is None:
                raise ValueError("num_classes='sequential' needs adm_in_channels")
            self.label_emb = nn.Sequential(nn.Sequential(linear(adm_in_channels, time_embed_dim), nn.SiLU(),
                                                         linear(time_embed_dim, time_embed_dim)))

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))])
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(self.num_res_blocks[level]):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch, transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(
                    Downsample(ch, conv_resample, dims=dims, out_channels=ch)))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            resblock(ch), transformer(ch, transformer_depth_middle), resblock(ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                ich = input_block_chans.pop()
                layers = [resblock(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch, transformer_depth[level]))
                if level and i == self.num_res_blocks[level]:
                    layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)))

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("must specify y if and only if the model is class-conditional")
        hs = []
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False))
        if self.num_classes is not None:
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"vector batch {y.shape[0]} != latent batch {x.shape[0]}")
            emb = emb + self.label_emb(y)
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb, context)
        return self.out(h.type(x.dtype))


class OpenAIWrapper(nn.Module):
    """sgm.modules.diffusionmodules.wrappers.OpenAIWrapper: `sd_model.model`, holding `.diffusion_model`."""

    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, c, **kwargs):
        x = torch.cat((x, c.get("concat", torch.Tensor([]).type_as(x))), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn", None), y=c.get("vector", None),
                                    **kwargs)


class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    """sgm's bigG text tower: same module tree as ldm's FrozenOpenCLIPEmbedder; returns (penultimate, pooled)."""

    def __init__(self, arch, version=None, device="cpu", max_length=77, freeze=True, layer="penultimate",
                 always_return_pooled=True):
        super().__init__(arch=arch, version=version, device=device, max_length=max_length, freeze=freeze,
                         layer=layer)
        self.return_pooled = always_return_pooled
        self.legacy = False

    def forward(self, text):
        import open_clip
        tokens = open_clip.tokenize(text).to(self.device)
        z = self.encode_with_transformer(tokens)
        return (z[self.layer], z["pooled"]) if self.return_pooled else z[self.layer]

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text) + self.model.positional_embedding
        x = x.permute(1, 0, 2)  # NLD -> LND (open_clip 2.20 transformer is sequence-first)
        outputs = {}
        blocks = self.model.transformer.resblocks
        for i, r in enumerate(blocks):
            if i == len(blocks) - 1:
                outputs["penultimate"] = x.permute(1, 0, 2)
            x = r(x, attn_mask=self.model.attn_mask)
        outputs["last"] = self.model.ln_final(x.permute(1, 0, 2))
        # EOT token has the highest id in each sequence.
        outputs["pooled"] = outputs["last"][torch.arange(text.shape[0]), text.argmax(dim=-1)] @ self.model.text_projection
        return outputs


class ConcatTimestepEmbedderND(nn.Module):
    """sgm's size/crop embedder: sinusoidal embedding of each number, concatenated (no parameters)."""

    def __init__(self, outdim, input_key):
        super().__init__()
        self.outdim = outdim
        self.input_key = input_key
        self.is_trainable = False
        self.ucg_rate = 0.0

    def forward(self, x):
        if x.ndim == 1:
            x = x[:, None]
        b, dims = x.shape
        emb = timestep_embedding(x.reshape(b * dims), self.outdim)
        return emb.reshape(b, dims * self.outdim)


class GeneralConditioner(nn.Module):
    """sgm.modules.GeneralConditioner: runs every embedder and concatenates outputs by rank."""
    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, embedders):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)

    def forward(self, batch, force_zero_embeddings=None):
        output = {}
        force_zero_embeddings = force_zero_embeddings or []
        for embedder in self.embedders:
            with torch.enable_grad() if getattr(embedder, "is_trainable", False) else torch.no_grad():
                emb_out = embedder(batch[embedder.input_key])
            if not isinstance(emb_out, (list, tuple)):
                emb_out = [emb_out]
            for emb in emb_out:
                key = self.OUTPUT_DIM2KEYS[emb.dim()]
                if embedder.input_key in force_zero_embeddings:
                    emb = torch.zeros_like(emb)
                output[key] = torch.cat((output[key], emb), self.KEY2CATDIM[key]) if key in output else emb
        return output


class DiffusionEngine(nn.Module):
    """The attributes of sgm.models.diffusion.DiffusionEngine that A1111 and LoRA code touch."""

    def __init__(self, unet, conditioner, first_stage_model, scale_factor=0.13025):
        super().__init__()
        self.model = OpenAIWrapper(unet)
        self.conditioner = conditioner
        self.first_stage_model = first_stage_model
        self.scale_factor = scale_factor
        self.disable_first_stage_autocast = True
        self.input_key = "jpg"
        self.loss_fn = None

    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.scale_factor * self.first_stage_model.encode(x).sample()

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)
