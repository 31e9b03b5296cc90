"""A1111 1.10's Prompts from file or textbox script (`sdlab.pipeline.prompts_file`, `sdlab txt2img --prompts-file`):
the line parser, the prompts and the seeds against A1111's code transcribed below (its error texts included), and
every picture drawn equal to the single `sdlab txt2img` run its line stands for (the shipped model, 64 px)."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import pixels, run
from sdlab.pipeline.png_info import parse_parameters, read_parameters
from sdlab.pipeline.prompts_file import (
    PROMPT_TAGS, PromptsFileError, a1111_sampler_name, line_args, line_prompts, line_seeds, read_lines,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# A1111 (AUTOMATIC1111/stable-diffusion-webui v1.10, scripts/prompts_from_file.py `prompt_tags`, `cmdargs` and
# `Script.run`), transcribed; its `samplers_map` is `a1111_sampler_name`, its checkpoint lookup the identity here.

def process_string_tag(tag):
    return tag


def process_int_tag(tag):
    return int(tag)


def process_float_tag(tag):
    return float(tag)


def process_boolean_tag(tag):
    return True if (tag == "true") else False


prompt_tags = {
    "sd_model": lambda tag: tag,
    "outpath_samples": process_string_tag,
    "outpath_grids": process_string_tag,
    "prompt_for_display": process_string_tag,
    "prompt": process_string_tag,
    "negative_prompt": process_string_tag,
    "styles": process_string_tag,
    "seed": process_int_tag,
    "subseed_strength": process_float_tag,
    "subseed": process_int_tag,
    "seed_resize_from_h": process_int_tag,
    "seed_resize_from_w": process_int_tag,
    "sampler_index": process_int_tag,
    "sampler_name": process_string_tag,
    "batch_size": process_int_tag,
    "n_iter": process_int_tag,
    "steps": process_int_tag,
    "cfg_scale": process_float_tag,
    "width": process_int_tag,
    "height": process_int_tag,
    "restore_faces": process_boolean_tag,
    "tiling": process_boolean_tag,
    "do_not_save_samples": process_boolean_tag,
    "do_not_save_grid": process_boolean_tag
}


def a1111_cmdargs(line):
    args = shlex.split(line)
    pos = 0
    res = {}

    while pos < len(args):
        arg = args[pos]

        if not arg.startswith("--"):        # A1111's asserts, spelled out: pytest rewrites asserts' messages here
            raise AssertionError(f'must start with "--": {arg}')
        if not pos+1 < len(args):
            raise AssertionError(f'missing argument for command line option {arg}')

        tag = arg[2:]

        if tag == "prompt" or tag == "negative_prompt":
            pos += 1
            prompt = args[pos]
            pos += 1
            while pos < len(args) and not args[pos].startswith("--"):
                prompt += " "
                prompt += args[pos]
                pos += 1
            res[tag] = prompt
            continue

        func = prompt_tags.get(tag, None)
        if not func:
            raise AssertionError(f'unknown commandline option: {arg}')

        val = args[pos+1]
        if tag == "sampler_name":
            val = a1111_sampler_name(val)

        res[tag] = func(val)

        pos += 2

    return res


def a1111_jobs(prompt_txt):
    lines = [x for x in (x.strip() for x in prompt_txt.splitlines()) if x]
    jobs = []
    for line in lines:
        if "--" in line:
            try:
                args = a1111_cmdargs(line)
            except Exception:
                args = {"prompt": line}
        else:
            args = {"prompt": line}
        jobs.append(args)
    return jobs


def a1111_error(line):
    try:
        a1111_cmdargs(line)
    except Exception as err:        # A1111 reports it (`errors.report`) and draws the line as a prompt
        return str(err)
    return None


LINES = [
    "a red apple",
    '--prompt "a green pear, (ripe:1.2)" --negative_prompt blurry dark --steps 12 --seed 7',
    "--prompt a cat --sampler_name k_euler_a --width 512 --height 768 --n_iter 2 --cfg_scale 6.5",
    "--prompt 'it''s quoted' --tiling true --restore_faces yes --subseed_strength 0.25 --sampler_name euler",
    "--sampler_name nonsense --prompt x",
    "--sd_model sd15.safetensors --prompt x --outpath_samples out/x --do_not_save_samples true",
    "--prompt a --step 3",                      # unknown commandline option: --step
    "--prompt a --steps",                       # missing argument for command line option --steps
    "prompt -- --steps 3",                      # must start with "--": prompt
    "--prompt a --steps twenty",                # invalid literal for int() with base 10: 'twenty'
    "--prompt a --cfg_scale 7,5",               # could not convert string to float: '7,5'
    '--prompt "unclosed --steps 3',             # No closing quotation
    "a red -- apple",
    "  --prompt spaced   --seed -1  ",
]


@pytest.mark.parametrize("line", LINES)
def test_line_parser_is_a1111s(line: str) -> None:
    assert list(PROMPT_TAGS) == list(prompt_tags)
    error = a1111_error(line.strip()) if "--" in line else None
    if error is None and "--" in line:
        assert line_args(line.strip()) == a1111_cmdargs(line.strip())
    elif error is not None:
        with pytest.raises(PromptsFileError) as caught:
            line_args(line.strip())
        assert str(caught.value) == error


def test_read_lines_draws_what_a1111_draws() -> None:
    text = "\n".join(LINES[:3] + ["", "   "] + LINES[3:]) + "\n\n"
    lines = read_lines(text)
    assert [line.args for line in lines] == a1111_jobs(text)
    assert [line.number for line in lines][:4] == [1, 2, 3, 6]
    assert [line.error for line in lines if line.error] == [error for line in LINES
                                                                if "--" in line and (error := a1111_error(line.strip()))]
    assert read_lines("--sd_model nope --prompt x", lambda name: None)[0].error == "Unknown checkpoint: nope"
    assert a1111_sampler_name("K_EULER_A") == "Euler a" and a1111_sampler_name("euler_ancestral") is None  # ComfyUI's


@pytest.mark.parametrize("text, name", [
    ("ddim", "DDIM"), ("plms", "PLMS"), ("lcm", "LCM"), ("Ddim", "DDIM"),   # A1111's names, lower-cased
    ("k_euler_a", "Euler a"), ("ddim_cfgpp", "DDIM CFG++"), ("k_lcm", "LCM"),  # its aliases
    ("euler_ancestral", None), ("dpmpp_2m", None),                          # ComfyUI's names only
])
def test_sampler_name_is_looked_up_as_a1111s_samplers_map(text: str, name: str | None) -> None:
    """A1111 1.10 `set_samplers`: ``samplers_map[sampler.name.lower()] = sampler.name`` and the same for each alias,
    so "--sampler_name ddim" draws DDIM there (`cmdargs`: ``samplers_map.get(val.lower())``)."""
    assert line_args(f"--prompt x --sampler_name {text}") == {"prompt": "x", "sampler_name": name}


def a1111_line_prompt(args, p_prompt, prompt_position):      # Script.run, each line's copy_p.prompt
    prompt = args.get("prompt", p_prompt)
    if args.get("prompt") and p_prompt:
        if prompt_position == "start":
            prompt = args.get("prompt") + " " + p_prompt
        else:
            prompt = p_prompt + " " + args.get("prompt")
    return prompt


@pytest.mark.parametrize("args", [{}, {"prompt": "a cat"}, {"prompt": ""}, {"negative_prompt": "dark"}])
@pytest.mark.parametrize("base", ["", "masterpiece"])
@pytest.mark.parametrize("position", ["start", "end"])
def test_line_prompts_are_a1111s(args: dict, base: str, position: str) -> None:
    joined = line_prompts(args, base, base, position)
    assert joined["prompt"] == a1111_line_prompt(args, base, position)
    negative = {"prompt": args["negative_prompt"]} if "negative_prompt" in args else {}
    assert joined["negative_prompt"] == a1111_line_prompt(negative, base, position)


def a1111_seeds(p_seed, checkbox_iterate, checkbox_iterate_batch, batch_size, n_iter, count, drawn):
    if (checkbox_iterate or checkbox_iterate_batch) and p_seed == -1:
        p_seed = drawn
    seeds = []
    for _ in range(count):
        seeds.append(p_seed)
        if checkbox_iterate:
            p_seed = p_seed + (batch_size * n_iter)
    return seeds, p_seed


@pytest.mark.parametrize("seed", [5, -1])
@pytest.mark.parametrize("iterate, same", [(False, False), (True, False), (False, True), (True, True)])
def test_line_seeds_are_a1111s(monkeypatch, seed: int, iterate: bool, same: bool) -> None:
    monkeypatch.setattr("sdlab.pipeline.request.random.randrange", lambda n: 1234)
    assert line_seeds(seed, 4, iterate, same, 2, 3) == a1111_seeds(seed, iterate, same, 2, 3, 4, 1234)


PROMPTS_FILE = """a red apple
--prompt "a green pear" --negative_prompt blurry --steps 3 --seed 7

--prompt a blue cup --sampler_name k_euler_a --n_iter 2
"""


def test_prompts_file_pictures_equal_single_runs(tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS_FILE)
    out = tmp_path / "out"
    code, stdout, err = run(["txt2img", "still life", "--prompts-file", str(prompts), "--insert-prompts", "end",
                             "--steps", "2", "--seed", "3", "--iterate-seed", "--out", str(out), "--no-progress"],
                            capsys)
    assert code == 0, err
    files = stdout.split()
    assert len(files) == 4
    singles = [(["still life a red apple", "--seed", "3", "--steps", "2"]),
               (["still life a green pear", "--negative", "blurry", "--seed", "7", "--steps", "3"]),
               (["still life a blue cup", "--sampler", "Euler a", "--seed", "5", "--steps", "2", "--batch-count", "2"])]
    want = []
    for n, options in enumerate(singles):
        code, single, err = run(["txt2img", *options, "--out", str(tmp_path / f"single{n}"), "--no-progress"], capsys)
        assert code == 0, err
        want += single.split()
    for got, expected in zip(files, want):
        assert np.array_equal(pixels(Path(got)), pixels(Path(expected)))
        assert read_parameters(got) == read_parameters(expected)
    assert [parse_parameters(read_parameters(f))["Seed"] for f in files] == [3, 7, 5, 6]


@pytest.mark.parametrize("text, match", [
    ("a cat\n--prompt a --step 3\n", "line 2: unknown commandline option: --step; did you mean --steps? (A1111 would draw"),
    ("--prompt a --cfg-scale 5\n", "line 1: unknown commandline option: --cfg-scale; did you mean --cfg_scale? (A1111"),
    ("--prompt a --batch-count 2\n", "line 1: unknown commandline option: --batch-count; did you mean --n_iter?"),
    ("--prompt a --negative x\n", "line 1: unknown commandline option: --negative; did you mean --negative_prompt?"),
    ("--prompt a --sampler_name nonsense\n", "line 1: --sampler_name is none of A1111's sampler names"),
    ("--prompt a --restore_faces true\n", "line 1: --restore_faces true: sdlab has no face restoration"),
    ("--prompt a --steps 0\n", "line 1:"),
    ("a cat\n--prompt a --steps abc\n",
     "line 2: --steps: invalid int value: 'abc', expected a whole number (A1111 would draw"),
    ("--prompt a --seed 1.5\n", "line 1: --seed: invalid int value: '1.5', expected a whole number"),
    ("--prompt a --cfg_scale 7,5\n", "line 1: --cfg_scale: invalid float value: '7,5', expected a number"),
    ("\n  \n", "no line to draw"),
])
def test_prompts_file_errors_before_any_work(tmp_path: Path, capsys, text: str, match: str) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(text)
    out = tmp_path / "out"
    code, _, err = run(["txt2img", "--prompts-file", str(prompts), "--out", str(out)], capsys)
    assert code == 2 and match in err and "Traceback" not in err, err
    assert not out.exists()


def test_prompts_file_holds_one_model_at_a_time(tmp_path: Path, capsys, monkeypatch) -> None:
    """A line's --sd_model lets the model before go (A1111's Maximum number of checkpoints loaded: 1); the shipped
    model named by its path is the default one, not a second load."""
    import shutil

    import sdlab.cli.generate as generate
    from sdlab.api import shipped_model_path

    other = tmp_path / "other.safetensors"
    shutil.copy(shipped_model_path(), other)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a cat\n--prompt a cat --sd_model {shipped_model_path()}\n--prompt a dog --sd_model {other}\n"
                       "--prompt a dog --sd_model other.safetensors\na bird\n")
    loads, held = [], []
    load, run_generate = generate._load_pipeline, generate.run_generate

    def counting_load(args, model=None, *rest):
        loads.append(Path(model or args.model or shipped_model_path()).name)
        return load(args, model, *rest)

    def run_line(ns, pipelines=None):
        code = run_generate(ns, pipelines)
        if pipelines is not None:                           # a line's run
            held.append(len(pipelines))
        return code

    monkeypatch.setattr(generate, "_load_pipeline", counting_load)
    monkeypatch.setattr(generate, "run_generate", run_line)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["txt2img", "--prompts-file", str(prompts), "--steps", "1", "--out", str(tmp_path / "out"),
                        "--no-progress"], capsys)
    assert code == 0, err
    assert held == [1] * 5
    assert loads == [shipped_model_path().name, "other.safetensors", shipped_model_path().name]


def test_a_lines_outpath_samples_is_a_folder(tmp_path: Path, capsys) -> None:
    """A1111's outpath_samples is a folder, a name with an image extension too: no line writes over another's."""
    shots = tmp_path / "shots.png"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"--prompt a cat --outpath_samples {shots}\n--prompt a dog --outpath_samples {shots}\n")
    code, stdout, err = run(["txt2img", "--prompts-file", str(prompts), "--steps", "1", "--out",
                             str(tmp_path / "out"), "--no-progress"], capsys)
    assert code == 0, err
    files = [Path(name) for name in stdout.split()]
    assert len(set(files)) == 2 and all(file.parent == shots and file.exists() for file in files)
    assert [parse_parameters(read_parameters(file))["Prompt"] for file in files] == ["a cat", "a dog"]


@pytest.mark.parametrize("mode, line, match", [
    ("img2img", "--prompt a dog --steps 0", "line 2: steps must be an integer in 1..1000, got 0"),
    ("inpaint", "--prompt a dog --steps 0", "line 2: steps must be an integer in 1..1000, got 0"),
    ("img2img", "--prompt a dog --batch_size 0", "line 2: batch size must be an integer"),
    ("txt2img", "--prompt a dog --sd_model {tmp}/notes.txt", "line 2: Unknown checkpoint: "),
    ("txt2img", "--prompt a dog --sd_model {tmp}", "line 2: Unknown checkpoint: "),         # a folder, no model
    ("txt2img", "--prompt a dog --sd_model {tmp}/bad.safetensors", "line 1: "),             # a load error, named
])
def test_prompts_file_lines_of_every_mode_are_checked_before_any_work(tmp_path: Path, capsys, mode: str, line: str,
                                                                      match: str) -> None:
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    line = line.format(tmp=tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{line}\na cat\n" if "bad" in line else f"a cat\n{line}\n")
    out = tmp_path / "out"
    pictures = {"txt2img": [], "img2img": ["--init", str(tmp_path / "init.png")],
                "inpaint": ["--init", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png")]}[mode]
    code, _, err = run([mode, *pictures, "--prompts-file", str(prompts), "--steps", "4", "--out", str(out),
                        "--no-progress"], capsys)
    assert code == 2 and f"--prompts-file {prompts} {match}" in err and "Traceback" not in err, err
    assert not out.exists()


def test_a_byte_order_mark_starts_no_line(tmp_path: Path, capsys) -> None:
    """A file saved "UTF-8 with BOM": its first line reads as tags (here refused for its sampler, line named)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeff--prompt a cat --sampler_name nonsense\n".encode("utf-8"))
    code, _, err = run(["txt2img", "--prompts-file", str(prompts), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "line 1: --sampler_name is none of A1111's sampler names" in err, err


@pytest.mark.parametrize("flags", [["--iterate-seed"], ["--same-random-seed"], ["--insert-prompts", "start"],
                                   ["--insert-prompts", "end", "--iterate-seed"]])
def test_prompts_file_settings_need_a_prompts_file(tmp_path: Path, capsys, flags: list[str]) -> None:
    out = tmp_path / "out"
    code, _, err = run(["txt2img", "a cat", *flags, "--out", str(out)], capsys)
    given = ", ".join(flag for flag in flags if flag.startswith("--"))
    assert code == 2 and f"{given}: give --prompts-file" in err and "Traceback" not in err, err
    assert not out.exists()
