"""Analytic FLOP counts of a TBAC-UniImage training step and sampling call, and MFU.

Our own counter (no library counts this model); every figure is *model* FLOPs, the useful work of the
step, not what a particular implementation executes (no remat, no padding tricks):

* A weight matmul of N parameters over T tokens is 2NT forward. Trained parts (SANA, the connector)
  count 6NT (forward, input gradients, weight gradients); frozen parts that gradients pass through
  (the MLLM on the metaquery tokens) count 4NT (forward + input gradients only); forward-only parts
  (the prompt before the queries, the autoencoder encode) count 2NT.
* Attention cores are counted as their actual matmuls, 3x forward when differentiated:
  - softmax attention: 4 * T_q * T_k * d per head forward (QK^T and PV). Under the MLLM's causal
    mask T_k is the number of keys each query actually sees (the prompt block sums to T(T+1)/2).
  - SANA's ReLU linear attention: V is padded with a row of ones, so K^T V is 2 * N * d * (d+1)
    per head and (K^T V) Q another 2 * N * d * (d+1).
  - DC-AE's multiscale attention: the same linear form when H*W > head_dim, else quadratic.
* Convolutions: 2 * H_out * W_out * k^2 * C_in * C_out / groups (the depthwise 3x3 of SANA's
  GLUMBConv is 2 * N * 9 * C).
* Elementwise work (norms, activations, softmax, RoPE, the loss) and biases are not counted.
* MLLM layers: only the decoder layers the ladder reads are needed (hidden-state index k is the
  output of layer k-1), so the count uses `max(ladder_indices)` layers; there is no LM head (the
  official model replaces it by Identity and we never compute logits).

A prompt is `prompt_tokens` long (padded, static shapes): the prompt proper, then the N metaquery
tokens, then the 2 suffix tokens (`<|vision_end|><|im_end|>`, which the split-prompt path skips).
"""

from __future__ import annotations

from uniimage_jax.models.dc_ae import DCAEConfig
from uniimage_jax.models.pixel_ae import PixelAEConfig
from uniimage_jax.models.qwen2_5_vl import Qwen2_5_VLConfig
from uniimage_jax.models.sana import SanaConfig

TIMESTEP_SINUSOID_DIM = 256   # SANA's time projection input width
SUFFIX_TOKENS = 2             # <|vision_end|><|im_end|> after the metaqueries

# Dense bf16 peak FLOP/s per chip (the vendors' data sheets), matched against `device_kind` in order.
PEAK_BF16_FLOPS = (
    ("h100", 989e12), ("h200", 989e12),
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5 lite", 197e12), ("v5e", 197e12),
    ("v5p", 459e12), ("tpu v5", 459e12),
    ("v4", 275e12),
)


# ------------------------------------------------------------------------------------ MLLM


def mllm_layer_params(c: Qwen2_5_VLConfig) -> int:
    """Weight-matmul parameters of one decoder layer (q, k, v, o projections and the gated MLP)."""
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    return c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size


def mllm_forward(c: Qwen2_5_VLConfig, tokens: int, key_pairs: int, layers: int) -> dict:
    """Forward FLOPs of `layers` decoder layers over `tokens` tokens whose queries see `key_pairs`
    (query, key) pairs in total."""
    return {"matmul": 2.0 * mllm_layer_params(c) * tokens * layers,
            "attention": 4.0 * key_pairs * c.head_dim * c.num_attention_heads * layers}


def causal_pairs(first: int, count: int) -> int:
    """(query, key) pairs of `count` queries at positions first..first+count-1 under a causal mask."""
    return count * first + count * (count + 1) // 2


# ------------------------------------------------------------------------------------ SANA


def sana_forward(c: SanaConfig, latent_size: int, context_tokens: int, *,
                 ladder: bool = True) -> dict:
    """Forward FLOPs of SANA for one sample (latents latent_size^2, `context_tokens` caption
    tokens; with `ladder` every block has its own context, so caption_projection runs per block)."""
    d = c.inner_dim
    n = (latent_size // c.patch_size) ** 2
    m = context_tokens
    hidden = c.ffn_hidden
    dc = c.num_cross_attention_heads * c.cross_attention_head_dim
    hd = c.attention_head_dim
    contexts = c.num_layers if ladder else 1
    embed = (2.0 * n * c.in_channels * c.patch_size ** 2 * d                     # patch_embed
             + 2.0 * (TIMESTEP_SINUSOID_DIM * d + d * d + d * 6 * d)              # time embedding
             + 2.0 * contexts * m * (c.caption_channels * d + d * d))             # caption_projection
    block_matmul = (2.0 * n * d * d * 4                                           # self q, k, v, out
                    + 2.0 * n * d * dc * 2 + 2.0 * m * d * dc * 2                 # cross q, out; k, v
                    + 2.0 * n * d * 2 * hidden + 2.0 * n * hidden * d)            # FFN 1x1 convs
    block_attention = (c.num_attention_heads * 2 * (2.0 * n * hd * (hd + 1))      # linear attention
                       + 4.0 * n * m * dc)                                        # cross softmax
    block_depthwise = 2.0 * n * 9 * 2 * hidden                                    # 3x3 depthwise
    out = 2.0 * n * d * c.patch_size ** 2 * c.out_dim                             # proj_out
    layers = c.num_layers
    return {"matmul": embed + out + layers * block_matmul,
            "attention": layers * block_attention, "depthwise": layers * block_depthwise}


# ------------------------------------------------------------------------------ autoencoder


def _conv(hw: int, k: int, cin: int, cout: int, groups: int = 1) -> float:
    return 2.0 * hw * k * k * cin * cout / groups


def dc_ae_encode(c: DCAEConfig, image_size: int) -> float:
    """Forward FLOPs of the DC-AE encoder for one image (diffusers `Encoder`)."""
    chans, nl = c.encoder_block_out_channels, c.encoder_layers_per_block
    hd = c.attention_head_dim
    hw = image_size * image_size
    total = _conv(hw, 3, c.in_channels, chans[0])                                 # conv_in
    for i, ch in enumerate(chans):
        for _ in range(nl[i]):
            if c.encoder_block_types[i] == "ResBlock":
                total += 2 * _conv(hw, 3, ch, ch)
                continue
            # EfficientViTBlock: multiscale linear attention + GLUMBConv (expand 4).
            heads = ch // hd
            inner = heads * hd
            scales = c.encoder_qkv_multiscales[i]
            total += 3 * _conv(hw, 1, ch, inner)                                  # to_q, to_k, to_v
            for k in scales:                                                     # aggregation
                total += _conv(hw, k, 3 * inner, 3 * inner, groups=3 * inner)
                total += _conv(hw, 1, 3 * inner, 3 * inner, groups=3 * heads)
            all_heads = heads * (1 + len(scales))
            if hw > hd:
                total += all_heads * 2 * (2.0 * hw * hd * (hd + 1))
            else:
                total += all_heads * 2 * (2.0 * hw * hw * hd)
            total += _conv(hw, 1, inner * (1 + len(scales)), ch)                  # to_out
            h = 4 * ch
            total += _conv(hw, 1, ch, 2 * h) + _conv(hw, 3, 2 * h, 2 * h, groups=2 * h) \
                + _conv(hw, 1, h, ch)
        if i < len(chans) - 1:
            hw //= 4                                                              # stride-2 conv
            total += _conv(hw, 3, ch, chans[i + 1])
    total += _conv(hw, 3, chans[-1], c.latent_channels)                          # conv_out
    return total


def vae_encode(c, image_size: int) -> float:
    if isinstance(c, PixelAEConfig):
        return 0.0  # space-to-depth: a reshape
    if isinstance(c, DCAEConfig):
        return dc_ae_encode(c, image_size)
    raise TypeError(f"no FLOP count for autoencoder config {type(c).__name__}")


# --------------------------------------------------------------------------- whole model


def _needed_layers(config) -> int:
    return max(config.ladder_indices)


def _check_prompt(config, prompt_tokens: int) -> int:
    prefix = prompt_tokens - config.num_metaqueries - SUFFIX_TOKENS
    if prefix < 1:
        raise ValueError(f"prompt_tokens={prompt_tokens} leaves no room for a prompt before the "
                         f"{config.num_metaqueries} metaqueries and {SUFFIX_TOKENS} suffix tokens")
    return prefix


def train_flops_per_sample(config, prompt_tokens: int) -> dict:
    """Model FLOPs of one training sample (split-prompt path: prompt forward once, backward over
    the metaquery positions only), by part, plus `dit_only` and `total`."""
    prefix = _check_prompt(config, prompt_tokens)
    n = config.num_metaqueries
    layers = _needed_layers(config)
    m, d = config.mllm, config.dit
    prompt = mllm_forward(m, prefix, causal_pairs(0, prefix), layers)
    queries = mllm_forward(m, n, causal_pairs(prefix, n), layers)
    connector_params = m.hidden_size * d.caption_channels + d.caption_channels ** 2
    sana = sana_forward(d, config.latent_size, n)
    parts = {
        "vae_encode": vae_encode(config.vae, config.image_size),
        "mllm_prompt": prompt["matmul"] + prompt["attention"],
        "mllm_queries": 2 * queries["matmul"] + 3 * queries["attention"],
        "connector": 6.0 * connector_params * d.num_layers * n,
        "dit": 3 * (sana["matmul"] + sana["attention"] + sana["depthwise"]),
    }
    parts["dit_only"] = parts["dit"]
    parts["total"] = sum(v for k, v in parts.items() if k != "dit_only")
    return parts


# ----------------------------------------------------------------------- prompt buckets

# Qwen2.5-VL chat-template tokens of a t2i prompt without its caption: 32 before it
# ("<|im_start|>system\n", the 24-token official system prompt, "<|im_end|>\n<|im_start|>user\n")
# and 5 after it ("<|im_end|>\n<|im_start|>assistant\n"), then the metaquery suffix
# (<|vision_start|>, the queries, <|vision_end|>, <|im_end|>).
T2I_TEMPLATE_TOKENS = 32 + 5 + 3

# The caption lengths assumed for the recipe figure: COCO-like captions of 15-40 words, uniformly,
# at ~1.3 Qwen BPE tokens per English word (punctuation included): 20-52 tokens; the t2i recipe
# drops 10% of captions to "" for classifier-free guidance.
COCO_LIKE_CAPTION_TOKENS = (20, 52)
T2I_CAPTION_DROPOUT = 0.1


def t2i_prompt_tokens_without_caption(num_metaqueries: int) -> int:
    return T2I_TEMPLATE_TOKENS + num_metaqueries


def bucket_probabilities(buckets, fixed_tokens: int, rows: int,
                         caption_tokens: tuple[int, int] = COCO_LIKE_CAPTION_TOKENS,
                         caption_dropout: float = T2I_CAPTION_DROPOUT) -> dict[int, float]:
    """{bucket: probability that a batch is padded to it} when a batch of `rows` prompts (the
    GLOBAL batch: every process pads to the bucket of the global longest prompt) of
    `fixed_tokens` + a caption is padded to the smallest bucket holding its longest prompt.
    Caption lengths are independent, uniform on the integers `caption_tokens` = (lo, hi), and
    each is dropped to empty with `caption_dropout`. Captions longer than the largest bucket
    holds are cut to fit it, so their batches go to the largest."""
    lo, hi = caption_tokens
    if not 0 <= lo <= hi or rows < 1 or not buckets:
        raise ValueError(f"need 0 <= lo <= hi, rows >= 1 and buckets; got {caption_tokens}, "
                         f"{rows}, {buckets}")

    def all_fit(room: int) -> float:  # P(every caption of the batch has <= room tokens)
        if room < 0:
            return 0.0
        one = caption_dropout + (1 - caption_dropout) * min(max((room - lo + 1) / (hi - lo + 1),
                                                                0.0), 1.0)
        return one ** rows

    out, below = {}, 0.0
    for b in buckets[:-1]:
        p = all_fit(b - fixed_tokens)
        out[int(b)] = p - below
        below = p
    out[int(buckets[-1])] = 1.0 - below
    return out


def bucketed_train_flops_per_sample(config, buckets, fixed_tokens: int, rows: int,
                                    **caption_distribution) -> dict:
    """`train_flops_per_sample` averaged over the buckets a batch is padded to (see
    `bucket_probabilities`), plus `mean_prompt_tokens` and `bucket_probabilities`."""
    probs = bucket_probabilities(buckets, fixed_tokens, rows, **caption_distribution)
    per_bucket = {b: train_flops_per_sample(config, b) for b in probs}
    out = {k: sum(p * per_bucket[b][k] for b, p in probs.items()) for k in per_bucket[buckets[0]]}
    out["mean_prompt_tokens"] = sum(p * b for b, p in probs.items())
    out["bucket_probabilities"] = probs
    return out


def sample_flops(config, prompt_tokens: int, *, num_steps: int, num_images: int,
                 guidance_rows: int = 2) -> dict:
    """Model FLOPs of one sampling call: the MLLM over every guidance row's full prompt (one
    forward), the connector, then `num_steps` SANA forwards over guidance_rows * num_images rows
    (decoding not included). Also `per_image` and `dit_per_step_per_image`."""
    _check_prompt(config, prompt_tokens)
    n, k = config.num_metaqueries, guidance_rows
    m, d = config.mllm, config.dit
    mllm = mllm_forward(m, prompt_tokens, causal_pairs(0, prompt_tokens), _needed_layers(config))
    connector = 2.0 * (m.hidden_size * d.caption_channels + d.caption_channels ** 2) \
        * d.num_layers * n
    sana = sana_forward(d, config.latent_size, n)
    dit_step = sana["matmul"] + sana["attention"] + sana["depthwise"]
    parts = {"conditioning": k * (mllm["matmul"] + mllm["attention"] + connector),
             "denoise": num_steps * k * num_images * dit_step}
    parts["total"] = parts["conditioning"] + parts["denoise"]
    parts["per_image"] = parts["total"] / num_images
    parts["dit_per_step_per_image"] = k * dit_step
    return parts


# ---------------------------------------------------------------------------------- MFU


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one chip, None when unknown (CPUs, other GPUs)."""
    kind = device_kind.lower()
    for key, peak in PEAK_BF16_FLOPS:
        if key in kind:
            return peak
    return None


def mfu(flops_per_s: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation; None when the peak or the rate is unknown."""
    return None if peak is None or flops_per_s is None else flops_per_s / peak
