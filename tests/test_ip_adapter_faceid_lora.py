"""An IP-Adapter FaceID file that also holds a LoRA for the U-Net's attentions (h94's ip-adapter-faceid_sd15.bin:
``ip_adapter.{n}.to_q_lora.down.weight`` ... for every attention n in diffusers' ``attn_processors`` order),
against diffusers 0.42, whose `load_ip_adapter` merges that LoRA at weight 1 (`_load_ip_adapter_loras`,
`load_lora_weights`, `set_adapters([faceid_0], [1.0])`); and the same LoRA as the separate kohya-named file h94
ships beside it (ip-adapter-faceid_sd15_lora.safetensors: ``lora_unet_<diffusers path>_to_q.lora_down.weight``,
no alpha), read by sdlab's ordinary LoRA loader. Pictures within `MAX_PIXEL_DIFF` / 255 on the same random weights;
the same file drawn without its LoRA more than 5 x that away."""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

from ip_adapter_fixtures import write_ip_adapter
from picture_parity import CFG, MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, STEPS, max_pixel_diff
from sdlab.models.ip_adapter import all_attentions, cross_attentions
from sdlab.pipeline.image_prompt import IPAdapterInput
from sdlab.pipeline.prompt_loras import LoraUse
from sdlab.pipeline.request import GenerationRequest
from test_ip_adapter import EULER, NEGATIVE, _family
from test_ip_adapter_layers import face_id_state

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = dict(steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, **EULER)
RANK = 4


def unet_lora(unet, context_dim: int, seed: int = 13, std: float = 0.2) -> dict[str, torch.Tensor]:
    """h94's FaceID LoRA with random weights: for every attention n (attn1 even, attn2 odd) to_q / to_k / to_v /
    to_out _lora.down (RANK, in) and .up (width, RANK); attn2's to_k / to_v read the text context."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for n, attn in enumerate(all_attentions(unet)):
        width = attn.to_q.weight.shape[0]
        for name in ("to_q", "to_k", "to_v", "to_out"):
            fan_in = context_dim if n % 2 and name in ("to_k", "to_v") else width
            lora[f"{n}.{name}_lora.down.weight"] = torch.randn(RANK, fan_in, generator=gen) * std
            lora[f"{n}.{name}_lora.up.weight"] = torch.randn(width, RANK, generator=gen) * std
    return lora


def kohya_file(path, lora: dict[str, torch.Tensor], processor_names: list[str]):
    """The same LoRA as h94's separate _lora.safetensors names it: lora_unet_ + the diffusers attention path."""
    tensors = {}
    for key, value in lora.items():
        n, rest = key.split(".", 1)
        name, part = rest.split("_lora.")
        layer = processor_names[int(n)].removesuffix(".processor") + "." + ("to_out.0" if name == "to_out" else name)
        tensors[f"lora_unet_{layer.replace('.', '_')}.lora_{part.replace('.weight', '')}.weight"] = value.contiguous()
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return _family(tmp_path_factory, "sd1", StableDiffusionPipeline, 51)


def test_face_id_file_with_a_unet_lora_matches_diffusers_and_the_separate_lora_file(sd1, tmp_path):
    ours, base, _, models, _ = sd1
    unet, context = ours.bundle.unet, ours.bundle.unet_config.context_dim
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(unet)]
    adapter = face_id_state(widths, context)
    lora = unet_lora(unet, context)
    with_lora = write_ip_adapter(models / "ip-adapter-faceid_tiny.bin",
                                 dict(adapter, ip_adapter={**adapter["ip_adapter"], **lora}))
    without = write_ip_adapter(models / "ip-adapter-faceid-nolora_tiny.bin", adapter)
    processors = list(base.unet.attn_processors)
    separate = kohya_file(models / "ip-adapter-faceid_tiny_lora.safetensors", lora, processors)
    face = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(4)), dim=-1)

    pipe = StableDiffusionPipeline(**base.components)
    pipe.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(models), subfolder="", weight_name=with_lora.name, image_encoder_folder=None)
    assert "faceid_0" in pipe.unet.peft_config                               # diffusers merged the LoRA
    pipe.set_ip_adapter_scale(0.8)
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, ip_adapter_image_embeds=[torch.cat([torch.zeros_like(face),
                     face]).unsqueeze(1)], num_inference_steps=STEPS, guidance_scale=CFG, width=SIZE, height=SIZE,
                     generator=torch.Generator().manual_seed(SEED), output_type="np").images
    pipe.unload_lora_weights()
    pipe.unload_ip_adapter()

    drawn = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(with_lora, face, 0.8)], **OPTIONS)
    no_lora = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(without, face, 0.8)], **OPTIONS)
    separately = ours.run(GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE,
                                            ip_adapters=[IPAdapterInput(without, face, 0.8)], **OPTIONS),
                          loras=[LoraUse(separate, 1.0, 1.0, separate.stem)])
    after = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(without, face, 0.8)], **OPTIONS)
    assert max_pixel_diff(drawn.images, reference) <= MAX_PIXEL_DIFF
    assert max_pixel_diff(separately.images, reference) <= MAX_PIXEL_DIFF
    assert max_pixel_diff(no_lora.images, reference) > 5 * MAX_PIXEL_DIFF
    assert max_pixel_diff(after.images, no_lora.images) == 0                 # the U-Net's own weights came back


def test_inspect_names_the_unet_lora(sd1):
    from sdlab.checkpoints.other_kinds import describe_other_kind

    ours, _, _, models, _ = sd1
    unet, context = ours.bundle.unet, ours.bundle.unet_config.context_dim
    adapter = face_id_state([attn.to_q.weight.shape[0] for attn in cross_attentions(unet)], context)
    path = write_ip_adapter(models / "ip-adapter-faceid_inspect.bin",
                            dict(adapter, ip_adapter={**adapter["ip_adapter"], **unet_lora(unet, context)}))
    described = describe_other_kind(path)
    assert described["kind"] == "IP-Adapter"
    assert described["facts"]["U-Net LoRA"].startswith("for the attentions, merged at weight 1")


def test_the_hires_second_pass_keeps_the_face_id_lora(sd1, tmp_path):
    """The hires fix with a FaceID file holding a U-Net LoRA and a hires prompt of its own (whose LoRAs the second
    pass merges in place of the first's): the FaceID LoRA stays merged in the second pass too, the picture of the
    hand-built expectation, the LoRA-less file with the same LoRA as a separate kohya file given for the run
    (`loras`, merged in both passes): 0/255; the LoRA-less file alone is 253/255 away. With the FaceID LoRA left
    out of `Pipeline.run`'s second-pass LoRAs the picture is 85/255 from the expectation, so this fails."""
    ours, base, _, models, _ = sd1
    unet, context = ours.bundle.unet, ours.bundle.unet_config.context_dim
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(unet)]
    adapter = face_id_state(widths, context)
    lora = unet_lora(unet, context, seed=31)
    with_lora = write_ip_adapter(models / "ip-adapter-faceid_hires.bin",
                                 dict(adapter, ip_adapter={**adapter["ip_adapter"], **lora}))
    without = write_ip_adapter(models / "ip-adapter-faceid-nolora_hires.bin", adapter)
    separate = kohya_file(models / "ip-adapter-faceid_hires_lora.safetensors", lora, list(base.unet.attn_processors))
    face = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(9)), dim=-1)
    hires = dict(OPTIONS, hr_scale=1.5, hr_denoise=0.5)

    def draw(path, hr_prompt=None, loras=()):
        more = {} if hr_prompt is None else dict(hr_prompt=hr_prompt, hr_negative_prompt=NEGATIVE)
        request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE,
                                    ip_adapters=[IPAdapterInput(path, face, 0.6)], **hires, **more)
        return ours.run(request, loras=loras).images

    hr_prompt = PROMPT + ", detailed"             # a hires prompt equal to the prompt is no hires prompt
    merged = draw(with_lora, hr_prompt)
    expected = draw(without, hr_prompt, [LoraUse(separate, 1.0, 1.0, separate.stem)])
    print("hires FaceID LoRA: vs the separate LoRA", max_pixel_diff(merged, expected),
          "vs no LoRA", max_pixel_diff(merged, draw(without, hr_prompt)))
    assert max_pixel_diff(merged, expected) <= MAX_PIXEL_DIFF
    assert max_pixel_diff(merged, draw(without, hr_prompt)) > 5 * MAX_PIXEL_DIFF


def test_two_face_id_files_with_loras_merge_both(sd1):
    """Two FaceID files each holding a U-Net LoRA: sdlab merges both at weight 1, diffusers' picture with
    ``set_adapters(["faceid_0", "faceid_1"], [1.0, 1.0])``. diffusers' `load_ip_adapter` alone leaves only the
    last file's LoRA active (its loop's ``set_adapters([faceid_k], [1.0])``), taken as an accident
    (`image_prompt.adapter_loras`): that picture is far from sdlab's."""
    ours, base, _, models, _ = sd1
    unet, context = ours.bundle.unet, ours.bundle.unet_config.context_dim
    adapter = face_id_state([attn.to_q.weight.shape[0] for attn in cross_attentions(unet)], context)
    files = [write_ip_adapter(models / f"ip-adapter-faceid_{name}.bin",
                              dict(adapter, ip_adapter={**adapter["ip_adapter"], **unet_lora(unet, context, seed=seed)}))
             for name, seed in (("first", 31), ("second", 32))]
    face = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(9)), dim=-1)
    embeds = torch.cat([torch.zeros_like(face), face]).unsqueeze(1)

    pipe = StableDiffusionPipeline(**base.components)
    pipe.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(models), subfolder="", weight_name=[f.name for f in files], image_encoder_folder=None)
    pipe.set_ip_adapter_scale([0.6, 0.5])

    def reference():
        return pipe(PROMPT, negative_prompt=NEGATIVE, ip_adapter_image_embeds=[embeds, embeds],
                    num_inference_steps=STEPS, guidance_scale=CFG, width=SIZE, height=SIZE,
                    generator=torch.Generator().manual_seed(SEED), output_type="np").images

    last_only = reference()
    pipe.set_adapters(["faceid_0", "faceid_1"], [1.0, 1.0])
    both = reference()
    pipe.unload_lora_weights()
    pipe.unload_ip_adapter()
    drawn = ours.txt2img(PROMPT, NEGATIVE, ip_adapters=[IPAdapterInput(files[0], face, 0.6),
                                                       IPAdapterInput(files[1], face, 0.5)], **OPTIONS)
    print("two FaceID LoRAs: sdlab vs diffusers both", max_pixel_diff(drawn.images, both),
          "vs diffusers' load_ip_adapter (last only)", max_pixel_diff(drawn.images, last_only))
    assert max_pixel_diff(drawn.images, both) <= MAX_PIXEL_DIFF
    assert max_pixel_diff(drawn.images, last_only) > 5 * MAX_PIXEL_DIFF
