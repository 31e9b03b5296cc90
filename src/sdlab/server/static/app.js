// sdlab web UI: plain JavaScript on sdlab's HTTP API (no build step).
//   lists:    /sdapi/v1/sd-models, sd-vae, samplers, schedulers, loras, options, latent-upscale-modes, upscalers,
//             prompt-styles
//   a PNG:    POST /api/parameters -> {info, settings, unread}
//   scripts:  /api/scripts (each tab's A1111 selectable scripts and the X/Y/Z plot axes sdlab draws)
//   jobs:     POST /api/jobs -> {id}; GET /api/jobs; GET/DELETE /api/jobs/{id}; POST /api/jobs/{id}/interrupt, skip;
//             GET /api/jobs/{id}/events (Server-Sent Events: queued, started, step, done, failed, cancelled)
"use strict";

const $ = (id) => document.getElementById(id);
const ACTIVE = new Set(["queued", "running"]);
const TERMINAL_EVENTS = new Set(["done", "failed", "cancelled", "interrupted"]);
const MASK_COLOUR = "#ff3df5";   // how the painted mask shows on the image (it is sent as white on black)
const SUBMITTED_KEY = "sdlab-submitted";   // sessionStorage (one per browser tab): this tab's jobs, over a reload
// The boxes of a tick box and its settings that go out as the native API's object of the box's id (`freeu`,
// `deep_cache`): each field is a number box (`integer`: a whole number) or, with `choices` ([value, text]), a select;
// `value` is the form's start and the API's default, which settings without the field fill (buildOptionBoxes,
// optionBoxRequest, fillOptionBox)
const OPTION_BOXES = [
  { id: "freeu", name: "FreeU",
    title: "FreeU (Si et al. 2023): the U-Net decoder's backbone features scaled by B1 / B2, its skip features' lowest frequencies by S1 / S2, at its two deepest stages; the model's U-Net, not a refiner's (Forge's FreeU Integrated)",
    fields: [
      { key: "b1", label: "B1", value: 1.3, min: -10, max: 10, step: 0.01,
        title: "Backbone factor of stage 1 (ComfyUI's FreeU_V2 default 1.3; FreeU's README: SD1.4 / SDXL 1.3, SD1.5 1.5; Forge's slider 1.01)" },
      { key: "b2", label: "B2", value: 1.4, min: -10, max: 10, step: 0.01,
        title: "Backbone factor of stage 2 (ComfyUI's FreeU_V2 default 1.4; FreeU's README: SD1.4 / SDXL 1.4, SD1.5 1.6; Forge's slider 1.02)" },
      { key: "s1", label: "S1", value: 0.9, min: -10, max: 10, step: 0.01,
        title: "Skip factor of stage 1 (ComfyUI's and FreeU's README: 0.9; Forge's slider 0.99)" },
      { key: "s2", label: "S2", value: 0.2, min: -10, max: 10, step: 0.01,
        title: "Skip factor of stage 2 (ComfyUI's and FreeU's README: 0.2; Forge's slider 0.95)" },
      { key: "version", label: "Version", value: 2, choices: [["2", "2"], ["1", "1"]],
        title: "2: ComfyUI's FreeU_V2 and Forge's, the backbone scaled by its normalised channel mean; 1: the paper's constant factor (diffusers' enable_freeu)" },
      { key: "convention", label: "Stages", value: "comfyui", choices: [["comfyui", "ComfyUI"], ["diffusers", "diffusers"], ["sd-webui-freeu", "sd-webui-freeu"]],
        title: "Which blocks are stages 1 and 2: by channel count (the original code, ComfyUI, Forge) or by up block (diffusers); sd-webui-freeu (A1111's FreeU extension): by channel count, the backbone factor on one channel more than half" },
      { key: "start", label: "Start", value: 0, min: 0, max: 1, step: 0.01,
        title: "The fraction of each pass's sampler steps where FreeU starts (Forge's Start step)" },
      { key: "end", label: "End", value: 1, min: 0, max: 1, step: 0.01,
        title: "The fraction of each pass's sampler steps after which FreeU stops (Forge's End step)" },
    ] },
  { id: "deep_cache", name: "DeepCache",
    title: "DeepCache (Ma et al. 2023): the whole U-Net runs every Interval-th sampler step of each pass, the steps between only its shallow Branch on the deep features the last whole step left: faster, a little less faithful; the model's U-Net, not a refiner's",
    fields: [
      { key: "interval", label: "Interval", value: 3, min: 1, max: 1000, step: 1, integer: true,
        title: "A whole U-Net step every this many steps (diffusers' DeepCache example: 3; 1: every step whole)" },
      { key: "branch", label: "Branch", value: 0, min: 0, max: 11, step: 1, integer: true,
        title: "DeepCache's cache_branch_id: 0, the cheapest, reruns the first convolution and the last decoder block; up to 11 (SD1 / SD2) or 8 (SDXL), deeper is slower and closer to the plain picture" },
    ] },
];
// checkboxes that show their options (A1111's "Hires. fix" and seed "Extra"); unticked, the request leaves them out
const TOGGLES = { enable_hr: "hires-options", "seed-extra": "seed-extra-options", enable_refiner: "refiner-options",
  ...Object.fromEntries(OPTION_BOXES.map((box) => [box.id, `${box.id}-options`])) };

// The seeds the server takes (pipeline/request.py MIN_SEED..MAX_SEED; -1 draws one); a test compares them and the
// defaults below with Python's (tests/test_webui_from_png.py::test_every_field_the_api_takes_reaches_the_job_...)
const MIN_SEED = -(2n ** 63n);
const MAX_SEED = 2n ** 64n - 1n;
// A seed in JSON, by its key; `parseJson` reads its digits as text: JavaScript's numbers hold integers exactly
// only up to 2^53, and the server's seeds go up to 2^64 - 1
const SEED_NUMBER = /("(?:seed|subseed)"\s*:\s*)(-?\d+)(?=\s*[,}\]])/g;
// Request fields the form has no control for and the native API does not take, with the notice's name of each
// (A1111's label where it has one), the value that changes nothing (the API's default) and when another value
// changes nothing either (`unused`): a reused job's or a dropped PNG's other value is named, the form drawing
// without it. A field the form lacks that is not here nor `KEPT` is named whenever it holds something (`isEmpty`).
const withoutInitImage = (s) => s.mode === "txt2img";
const NOT_IN_FORM = {
  noise_multiplier: { name: "Noise multiplier", none: 1, unused: withoutInitImage },
  mask_blur_y: { name: "Mask blur y", none: null, unused: (s) => s.mask_blur_y === s.mask_blur },
  quantize_timesteps: { name: "Timestep rounding", none: false },
  paste_back: { name: "paste_back", none: true },
  tiled_vae: { name: "tiled_vae", none: null },
  hr_upscaler_tile: { name: "ESRGAN tile", none: 192 },                 // A1111's options, on its API's jobs
  hr_upscaler_tile_overlap: { name: "ESRGAN tile overlap", none: 32 },
};
// Request fields the form has no control for and the native API takes, with their name (A1111's label), the API's
// value when unset and the controls whose change lets them go: a reused job's or a dropped PNG's other values are
// kept (`state.kept`), shown under "Override settings" (A1111's box of a pasted picture's settings without a
// control) each with a button that removes it, and sent with the form's requests until removed, one of those
// controls changes or other settings are restored; a reload forgets them with the rest of the form. The drawing
// conventions go with the sampler and schedule (a ComfyUI-spelt sampler, "euler_ancestral", is recorded as
// "Euler a" with ENSD 1, ComfyUI's initial noise, its img2img steps and its empty negative, encoded; the initial
// noise follows the schedule too), A1111's schedule ends, rho, Beta schedule alpha / beta, SGM noise multiplier
// and Discard penultimate sigma too, eta and k-diffusion's churn and noise scale (A1111's Sigma churn / tmin / tmax /
// noise) with the sampler, SDXL's conditioning with the picture's size; A1111's clip skip and ControlNet step
// rules, its Extra noise and Conditional mask weight (its pictures' and its API's jobs') stay.
const WITH_SAMPLING = ["sampler", "schedule"];
const WITH_SIZE = ["width", "height"];
const WITH_HIRES = ["hr_upscaler", "hr_scale", "hr_width", "hr_height"];
const KEPT = {
  // SDXL's second prompts go with the prompts
  prompt_2: { name: "Prompt 2", none: "", with: ["prompt"] },
  negative_prompt_2: { name: "Negative prompt 2", none: "", with: ["negative_prompt"] },
  eta_noise_seed_delta: { name: "ENSD", none: null, with: WITH_SAMPLING },
  init_noise: { name: "Initial noise", none: null, with: WITH_SAMPLING },
  img2img_convention: { name: "Img2img steps", none: "diffusers", with: WITH_SAMPLING },
  zero_empty_negative: { name: "Empty negative", none: null, with: WITH_SAMPLING },
  schedule_sigma_min: { name: "Schedule min sigma", none: 0, with: WITH_SAMPLING },
  schedule_sigma_max: { name: "Schedule max sigma", none: 0, with: WITH_SAMPLING },
  schedule_rho: { name: "Schedule rho", none: 0, with: WITH_SAMPLING },
  discard_penultimate_sigma: { name: "Discard penultimate sigma", none: false, with: WITH_SAMPLING },
  old_karras_sigmas: { name: "Use old karras scheduler sigmas", none: false, with: WITH_SAMPLING },
  beta_alpha: { name: "Beta schedule alpha", none: 0.6, with: WITH_SAMPLING },
  beta_beta: { name: "Beta schedule beta", none: 0.6, with: WITH_SAMPLING },
  sgm_noise_multiplier: { name: "SGM noise multiplier", none: false, with: WITH_SAMPLING },
  eta: { name: "Eta", none: null, with: ["sampler"] },
  // a hires sampler's own eta (A1111's DDIM's behind an ancestral sampler, read from its Eta DDIM; sdlab's Hires eta)
  hr_eta: { name: "Hires pass eta", none: null, with: ["sampler", "hr_sampler"] },
  // the hires pass's own seed and CFG scale, and ComfyUI's two-pass graph (a ComfyUI graph's job, its picture) go
  // with the hires controls
  hr_seed: { name: "Hires seed", none: null, with: WITH_HIRES },
  hr_cfg_scale: { name: "Hires CFG scale", none: null, with: WITH_HIRES },
  hr_convention: { name: "Hires convention", none: "a1111", with: WITH_HIRES },
  hr_crop: { name: "Hires crop", none: "disabled", with: WITH_HIRES },
  s_churn: { name: "Sigma churn", none: 0, with: ["sampler"] },
  s_tmin: { name: "Sigma tmin", none: 0, with: ["sampler"] },
  s_tmax: { name: "Sigma tmax", none: null, with: ["sampler"] },
  s_noise: { name: "Sigma noise", none: 1, with: ["sampler"] },
  // ComfyUI's VAEEncodeForInpaint grow_mask_by (a ComfyUI graph's job, its picture) goes with its sampler: it is
  // drawn under ComfyUI's img2img convention alone, which goes with the sampler too
  mask_grow: { name: "Mask grow", none: 0, with: WITH_SAMPLING },
  // A1111's UniPC options stay with its sampler
  unipc_variant: { name: "UniPC variant", none: "bh1", with: ["sampler"] },
  unipc_order: { name: "UniPC order", none: 3, with: ["sampler"] },
  unipc_lower_order_final: { name: "UniPC lower order final", none: true, with: ["sampler"] },
  // diffusers' CFG rescale, A1111's NGMS (all steps), Skip Early CFG and Pad conds (v0) stay
  guidance_rescale: { name: "CFG rescale", none: 0, with: [] },
  s_min_uncond: { name: "NGMS", none: 0, with: [] },
  s_min_uncond_all: { name: "NGMS all steps", none: false, with: [] },
  skip_early_cond: { name: "Skip Early CFG", none: 0, with: [] },
  pad_cond_uncond: { name: "Pad conds", none: false, with: [] },
  pad_cond_uncond_v0: { name: "Pad conds v0", none: false, with: [] },
  // diffusers' PAG options past its scale (the PAG scale box)
  pag_adaptive_scale: { name: "PAG adaptive scale", none: 0, with: [] },
  pag_layers: { name: "PAG layers", none: ["mid"], with: [] },
  clip_skip_convention: { name: "Clip skip rule", none: "diffusers", with: [] },
  sdxl_clip_l_skip: { name: "Clip skip SDXL", none: false, with: [] },
  extra_noise: { name: "Extra noise", none: 0, with: [] },
  inpainting_mask_weight: { name: "Conditional mask weight", none: 1, with: [] },
  // the hires pass's token merging ratio (its first pass's has a box)
  token_merging_ratio_hr: { name: "Token merging ratio hr", none: 0, with: [] },
  // A1111's mask_round and disable_extra_networks (its API's jobs'), Emphasis, Old prompt editing timelines, Downcast
  // alphas_cumprod and Noise Schedule stay too
  mask_round: { name: "Mask round", none: true, with: [] },
  disable_extra_networks: { name: "Disable extra networks", none: false, with: [] },
  control_convention: { name: "Control steps", none: "diffusers", with: [] },
  emphasis: { name: "Emphasis", none: "Original", with: [] },
  // ComfyUI's batch noise (one generator for a batch: a ComfyUI graph's job) stays too
  batch_noise: { name: "Batch noise", none: "per_image", with: [] },
  old_prompt_editing: { name: "Old prompt editing timelines", none: false, with: [] },
  downcast_alphas_cumprod: { name: "Downcast alphas_cumprod", none: false, with: [] },
  zero_terminal_snr: { name: "Noise Schedule", none: false, with: [], shown: "Zero Terminal SNR" },
  original_size: { name: "SDXL original size", none: null, with: WITH_SIZE },
  target_size: { name: "SDXL target size", none: null, with: WITH_SIZE },
  crops_coords_top_left: { name: "SDXL crop", none: [0, 0], with: WITH_SIZE },
  aesthetic_score: { name: "SDXL aesthetic score", none: 6, with: WITH_SIZE },
  negative_original_size: { name: "SDXL negative original size", none: null, with: WITH_SIZE },
  negative_target_size: { name: "SDXL negative target size", none: null, with: WITH_SIZE },
  negative_crops_coords_top_left: { name: "SDXL negative crop", none: [0, 0], with: WITH_SIZE },
  negative_aesthetic_score: { name: "SDXL negative aesthetic score", none: 2.5, with: WITH_SIZE },
};
// Settings the form takes apart from its controls (mode, model, LoRA list, refiner rule, `KEPT`), follow from what
// it sends (the hires pass's own count, the rule of an unset size: a job records its size) or list the PNG's
// unread labels
const KEPT_APART = new Set(["mode", "model", "vae", "loras", "styles", "refiner_convention", ...Object.keys(KEPT),
  "controls", "control_units", "ip_adapters", "first_pass_steps", "size_convention", "unread", "script_name", "script_args"]);

// A1111's selectable scripts: each one's `script_args` in its `Script.run` order, from its controls (`id`, read as
// `type`) or a value the form sends as it is (`value`: A1111's HTML notes, Loopback's interrogator, which sdlab has
// not, the X/Y/Z dropdown lists, which the text boxes stand for with "Use text inputs instead of dropdowns" on: a
// job's list, drawn with that option off, goes into its box, `into`: `fillDropdowns`)
const arg = (id, type) => ({ id, type });
const fixed = (value) => ({ value });
const dropdown = (into) => ({ value: [], into });
const SCRIPT_ARGS = {
  "X/Y/Z plot": [arg("xyz_x_type", "int"), arg("xyz_x_values", "text"), dropdown("xyz_x_values"),
    arg("xyz_y_type", "int"), arg("xyz_y_values", "text"), dropdown("xyz_y_values"),
    arg("xyz_z_type", "int"), arg("xyz_z_values", "text"), dropdown("xyz_z_values"),
    arg("xyz_draw_legend", "bool"), arg("xyz_include_lone_images", "bool"), arg("xyz_include_sub_grids", "bool"),
    arg("xyz_no_fixed_seeds", "bool"), arg("xyz_vary_seeds_x", "bool"), arg("xyz_vary_seeds_y", "bool"),
    arg("xyz_vary_seeds_z", "bool"), arg("xyz_margin_size", "int"), fixed(true)],
  "Prompt Matrix": [arg("pm_put_at_start", "bool"), arg("pm_different_seeds", "bool"), arg("pm_prompt_type", "text"),
    arg("pm_variations_delimiter", "text"), arg("pm_margin_size", "int")],
  "Prompts from file or textbox": [arg("pf_checkbox_iterate", "bool"), arg("pf_checkbox_iterate_batch", "bool"),
    arg("pf_prompt_position", "text"), arg("pf_prompt_txt", "text")],
  Loopback: [arg("lb_loops", "int"), arg("lb_final_denoising_strength", "number"), arg("lb_denoising_curve", "text"),
    fixed("None")],
  "SD upscale": [fixed(null), arg("sdu_overlap", "int"), arg("sdu_upscaler", "text"), arg("sdu_scale_factor", "number")],
  "Poor man's outpainting": [arg("pmo_pixels", "int"), arg("pmo_mask_blur", "int"), arg("pmo_inpainting_fill", "int"),
    arg("pmo_direction", "directions")],
  "Outpainting mk2": [fixed(null), arg("mk2_pixels", "int"), arg("mk2_mask_blur", "int"), arg("mk2_direction", "directions"),
    arg("mk2_noise_q", "number"), arg("mk2_color_variation", "number")],
};

const state = {
  mode: "txt2img",
  initImage: null,        // data URL of the image for img2img / inpaint
  maskPainted: false,
  maskFile: null,         // data URL of a loaded mask file, sent as it is while nothing is painted over it
  loras: [],              // [{name, weight}]
  styleList: [],          // GET /sdapi/v1/prompt-styles: [{name, prompt, negative_prompt}] (the server's styles)
  styles: [],             // the styles chosen, by name, in the order they apply
  follow: null,           // {id, source}: the one job whose event stream the page reads (one of its own)
  submitted: new Set(storedSubmitted()),   // ids of jobs this page queued and has not seen end
  activeIds: [],          // queued and running jobs at the last poll, oldest first (every page's)
  ownActiveIds: [],       // those this page queued: the only ones its viewer, progress and Cancel follow
  runningId: null,        // this page's job running now: the one Interrupt and Skip stop
  shownJob: null,         // id of the job the progress bar and viewer show
  chosenPictures: {},     // job id -> the picture of its batch last opened from its card's thumbnails (its img2img)
  missingModels: {},      // list id -> the model the reused or read settings name that it lacks (markMissingModel)
  lastSeed: null,         // the seed of the newest finished job this tab queued (or whose settings it reused)
  refinerConvention: "diffusers",   // the refiner's handoff rule: the native API's default, or the reused job's
  kept: {},               // the reused job's or dropped PNG's `KEPT` that are not the API's, until removed or a
                          // control they go with changes
  clock: null,            // {id, i, t}: the first step seen of the followed job, for the time left
  unreachable: false,     // a request found no server since the last poll that reached it
  jobsSignature: "",
  scripts: null,          // GET /api/scripts: each tab's scripts and X/Y/Z axes
  jobs: [],               // the newest jobs at the last poll (GET /api/jobs: a page of JOBS_PAGE)
  olderJobs: [],          // finished jobs past the polled page: Load more's pages, and those new jobs pushed out of it
  moreJobs: false,        // the last page read was full: the history may hold older jobs
};
const JOBS_PAGE = 100;    // jobs per GET /api/jobs (its default limit)

// The ids of the jobs this tab queued, kept in its sessionStorage so a reload goes on following them;
// another tab has its own (A1111 likewise gives each browser session its own task ids).
function storedSubmitted() {
  try { return JSON.parse(sessionStorage.getItem(SUBMITTED_KEY) || "[]"); } catch (_) { return []; }
}

function rememberSubmitted() {
  try { sessionStorage.setItem(SUBMITTED_KEY, JSON.stringify([...state.submitted])); } catch (_) { /* private mode */ }
}

function forgetSubmitted(id) {
  state.submitted.delete(id);
  rememberSubmitted();
}

// ---------------------------------------------------------------- HTTP

class ApiError extends Error {
  constructor(message, status = null) {
    super(message);
    this.status = status;       // the HTTP status of a server's answer; null where none came
  }
}

const UNREACHABLE = "cannot reach the server";   // the page's error while it cannot; gone once the server answers

function detailText(detail) {
  // FastAPI validation errors are a list of {loc, msg}; A1111-style errors a string (or {error, detail})
  if (detail == null) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => {
      const loc = Array.isArray(d.loc) ? d.loc.filter((x) => x !== "body").join(".") : "";
      return (loc ? loc + ": " : "") + (d.msg || JSON.stringify(d));
    }).join("\n");
  }
  if (typeof detail === "object") return detail.detail ? detailText(detail.detail) : detail.error || JSON.stringify(detail);
  return String(detail);
}

// JSON with every seed (`SEED_NUMBER`) as the text of its digits, exact however large
const parseJson = (text) => JSON.parse(text.replace(SEED_NUMBER, '$1"$2"'));

async function api(path, options = {}) {
  const init = { method: options.method || "GET", headers: {}, credentials: "same-origin" };
  if (options.body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    state.unreachable = true;
    throw new ApiError(`${UNREACHABLE} (${err.message})`);
  }
  const text = await response.text();
  let data = null;
  try { data = text ? parseJson(text) : null; } catch (_) { data = null; }
  if (!response.ok) {
    let message = data ? detailText(data.detail ?? data.error ?? data) : text.trim();
    // A1111-shaped errors (/sdapi, /controlnet) carry the reason in `errors` beside a short `detail`
    if (data && typeof data.errors === "string" && data.errors && data.errors !== message) message += `: ${data.errors}`;
    if (response.status === 429 && !message) message = "the queue is full; wait for a job to finish";
    throw new ApiError(`${response.status} ${response.statusText || ""}`.trim() + (message ? `: ${message}` : ""),
      response.status);
  }
  return data;
}

function showError(message) {
  showMessage($("error"), message);
}

function showNotice(message) {
  showMessage($("notice"), message);
}

// A message at the form's foot, in view: the page scrolls to it where it is out of view (the form is far taller than
// the window; Ctrl+Enter in the prompt or a button mid-form leaves the foot below)
function showMessage(box, message) {
  box.textContent = message;
  box.hidden = !message;
  const shown = box.getBoundingClientRect();
  if (message && (shown.top < 0 || shown.bottom > window.innerHeight)) box.scrollIntoView({ block: "nearest" });
}

// ---------------------------------------------------------------- lists

function fillSelect(select, items, { blank } = {}) {
  const previous = select.value;
  select.replaceChildren();
  if (blank) select.append(new Option(blank, ""));
  for (const item of items) {
    const option = new Option(item.label, item.value);
    for (const [key, value] of Object.entries(item.data || {})) option.dataset[key] = value ?? "";
    select.append(option);
  }
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
}

async function loadModels() {
  const [models, options] = await Promise.all([api("/sdapi/v1/sd-models"), api("/sdapi/v1/options").catch(() => ({}))]);
  const chosen = $("model").value;        // kept over a refresh when it is still there
  const items = (models || []).map((m) => ({
    label: m.title || m.model_name, value: m.title || m.model_name,
    data: { name: m.model_name, filename: m.filename || "", hash: m.hash || "" },
  }));
  fillSelect($("model"), items);
  fillSelect($("refiner"), items);          // a refiner is a model of the same list
  const current = options && options.sd_model_checkpoint;
  if (current && (!chosen || $("model").value !== chosen)) selectMatching($("model"), current);
}

// The VAE select: Automatic (the model's sidecar VAE, if any: A1111's default), None (the model's own), then
// the server's VAE files by name (/sdapi/v1/sd-vae), as A1111's SD VAE setting lists them
async function loadVaes() {
  const vaes = (await api("/sdapi/v1/sd-vae")) || [];
  const names = ["Automatic", "None", ...vaes.map((v) => v.model_name)];
  fillSelect($("vae"), names.map((name) => ({ label: name, value: name })));
}

async function loadLoras() {
  const loras = (await api("/sdapi/v1/loras")) || [];
  fillSelect($("lora"), loras.map((l) => ({ label: l.alias && l.alias !== l.name ? `${l.name} (${l.alias})` : l.name, value: l.name })),
    { blank: loras.length ? "choose a LoRA" : "no LoRAs found" });
  $("lora-add").disabled = !loras.length;
}

// The hires fix's upscalers, as A1111's: the latent modes ("Latent" first, A1111's default), then every
// upscaler of /sdapi/v1/upscalers (the plain resizes None, Lanczos, Nearest, then the server's model files), then
// ComfyUI's latent methods, which draw its two-pass graph (hr_convention comfyui: `hiresRequest`)
const COMFY_UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"];
async function loadHiresUpscalers() {
  const [latent, upscalers] = await Promise.all([api("/sdapi/v1/latent-upscale-modes"), api("/sdapi/v1/upscalers")]);
  const names = [...(latent || []), ...(upscalers || [])].map((u) => u.name);
  fillSelect($("hr_upscaler"), [...names.map((name) => ({ label: name, value: name })),
    ...COMFY_UPSCALE_METHODS.map((name) => ({ label: `ComfyUI ${name}`, value: name }))]);
  fillSelect($("sdu_upscaler"), (upscalers || []).map((u) => ({ label: u.name, value: u.name })));   // SD upscale's
}

async function loadLists() {
  const results = await Promise.allSettled([
    loadModels(),
    api("/sdapi/v1/samplers").then((samplers) => {
      const rows = (samplers || []).map((s) => ({
        label: s.name, value: s.name, data: { aliases: (s.aliases || []).join("\n") },
      }));
      fillSelect($("sampler"), rows, { blank: "model default" });   // left out of the request: the model's preset
      fillSelect($("hr_sampler"), rows, { blank: "Use same sampler" });      // or family default; the first pass's
    }),
    api("/sdapi/v1/schedulers").then((schedulers) => {     // A1111's "automatic" is the blank entry: unset; the
      const rows = (schedulers || []).filter((s) => s.name !== "automatic")     // aliases pick a job's recorded name
        .map((s) => ({ label: s.label || s.name, value: s.name, data: { aliases: (s.aliases || []).join("\n") } }));
      fillSelect($("schedule"), rows, { blank: "Automatic" });
      fillSelect($("hr_schedule"), rows, { blank: "Use same scheduler" });
    }),
    loadLoras(),
    loadStyles(),
    loadVaes(),
    loadHiresUpscalers(),
    loadScripts(),
    loadControlLists(),                     // controlnet.js: the ControlNet folder's models, the preprocessors
    loadLimits(),
  ]);
  const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
  if (failed.length) showError("Could not load the lists: " + failed.join("; "));
}

// The server's limits (sdlab serve --max-batch, --max-steps) as the number boxes' maxima: the box's arrows stop
// where the server would refuse
async function loadLimits() {
  const flags = await api("/sdapi/v1/cmd-flags");
  if (flags && flags.max_batch) $("batch_size").max = flags.max_batch;
  if (flags && flags.max_steps) for (const id of ["steps", "hr_steps"]) $(id).max = flags.max_steps;
}

// Select the option whose value, text or aliases match `wanted` (case-insensitive). Returns success.
function selectMatching(select, wanted) {
  if (wanted == null || wanted === "") { select.value = ""; return select.value === ""; }
  const exact = [...select.options].find((option) => option.value === String(wanted));   // A1111's "Beta", not "beta"
  if (exact) { select.value = exact.value; return true; }
  const key = String(wanted).trim().toLowerCase();
  const norm = (s) => String(s || "").trim().toLowerCase();
  for (const option of select.options) {
    const names = [option.value, option.text, option.dataset.name, option.dataset.filename, option.dataset.hash,
      ...(option.dataset.aliases || "").split("\n")].map(norm);
    const filenameStem = norm(option.dataset.filename).split(/[\\/]/).pop().replace(/\.[^.]*$/, "");
    if (names.includes(key) || (filenameStem && filenameStem === key)) {
      select.value = option.value;
      return true;
    }
  }
  // A model's title gains its " [hash]" once the server has hashed it, so the list and the settings may
  // differ by it: matched without it, as A1111's get_closet_checkpoint_match (re_strip_checksum)
  const bare = (s) => norm(s).replace(/\s*\[[^\]]+\]$/, "");
  const found = [...select.options].find((option) => bare(option.value) === bare(wanted) && bare(wanted) !== "");
  if (found) select.value = found.value;
  return Boolean(found);
}

// ---------------------------------------------------------------- LoRAs

function renderLoras() {
  const list = $("lora-list");
  list.replaceChildren();
  state.loras.forEach((lora, index) => {
    const item = document.createElement("li");
    item.dataset.name = lora.name;
    const name = document.createElement("span");
    name.textContent = lora.name;
    const weight = document.createElement("input");
    weight.type = "number";
    weight.step = "0.05";
    weight.value = lora.weight;
    weight.id = `lora-weight-${index}`;
    weight.setAttribute("aria-label", `Weight of ${lora.name}`);
    weight.addEventListener("change", () => { lora.weight = weight.value; });     // read when sent (`loraWeight`)
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "\u00d7";
    remove.setAttribute("aria-label", `Remove ${lora.name}`);
    remove.addEventListener("click", () => { state.loras.splice(index, 1); renderLoras(); });
    item.append(name, weight, remove);
    list.append(item);
  });
}

// The Add button: the chosen LoRA at the typed weight
function addChosenLora() {
  showError("");
  try {
    addLora($("lora").value, loraWeight("lora-weight"));
  } catch (err) {
    showError(err.message);
  }
}

// A LoRA weight box's number: an empty box or text that is not a number is an error, never weight 0
function loraWeight(id) {
  const weight = numberField(id);
  if (weight === undefined) throw new ApiError(`${typedNumber(id).label}: type the LoRA's weight (1: its full effect)`);
  return weight;
}

function addLora(name, weight) {
  if (!name) return;
  const existing = state.loras.find((l) => l.name === name);
  if (existing) existing.weight = weight;
  else state.loras.push({ name, weight });
  renderLoras();
}

// ---------------------------------------------------------------- styles

// A1111's prompt styles (`GET /sdapi/v1/prompt-styles`: the server's --styles-file) to choose from, or the list's
// empty state when the server has none
async function loadStyles() {
  state.styleList = (await api("/sdapi/v1/prompt-styles")) || [];
  fillSelect($("style-choice"), state.styleList.map((s) => ({ label: s.name, value: s.name })),
    { blank: state.styleList.length ? "add a style" : "no styles (sdlab serve --styles-file)" });
  $("style-choice").disabled = !state.styleList.length;
  renderStyles();
}

// The chosen styles in the order they apply (A1111's Styles box), each a chip with its texts as its title and a
// button that removes it
function renderStyles() {
  const list = $("style-list");
  list.replaceChildren();
  state.styles.forEach((name, index) => {
    const style = state.styleList.find((s) => s.name === name);
    const item = document.createElement("li");
    item.dataset.name = name;
    const label = document.createElement("span");
    label.textContent = name;
    if (style) label.title = [style.prompt, style.negative_prompt && `Negative: ${style.negative_prompt}`].filter(Boolean).join("\n");
    item.append(label, makeButton("\u00d7", "remove-style", () => { state.styles.splice(index, 1); renderStyles(); },
      `Remove style ${name}`));
    list.append(item);
  });
  list.hidden = !state.styles.length;
}

// The style picked in the list joins the chosen ones (once), after them
function addChosenStyle() {
  const name = $("style-choice").value;
  if (name && !state.styles.includes(name)) state.styles.push(name);
  $("style-choice").value = "";
  renderStyles();
}

// The settings' styles: a job's (its prompts as sent) or a dropped picture's (the server took their texts out of its
// prompts, `POST /api/parameters`); a picture naming none leaves the chosen ones, as A1111's option "Apply if any".
// A style the server lacks is named, not sent (the server would refuse the job).
function fillStyles(settings, unknown) {
  if (!Array.isArray(settings.styles)) return;
  const known = new Set(state.styleList.map((s) => s.name));
  state.styles = settings.styles.filter((name) => known.has(name));
  for (const name of settings.styles) if (!known.has(name)) unknown.push(`style "${name}" (not on this server)`);
  renderStyles();
}

// ---------------------------------------------------------------- mode, image and mask

function setMode(mode) {
  state.mode = mode;
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
    tab.tabIndex = tab.dataset.mode === mode ? 0 : -1;      // the ARIA tabs pattern: arrows move between tabs
  }
  $("image-section").hidden = mode === "txt2img";
  // an empty side is the model's default in txt2img, the initial image's own in img2img / inpaint (the server's rule)
  for (const id of ["width", "height"]) $(id).placeholder = mode === "txt2img" ? "model default" : "image's size";
  // A1111's hires fix is txt2img's; img2img's is ComfyUI's two-pass graph from a VAEEncode (`hiresRequest`)
  $("hires-section").hidden = mode === "inpaint";
  $("enable_hr-img2img-hint").hidden = mode !== "img2img";
  $("mask-tools").hidden = $("mask-options").hidden = mode !== "inpaint";
  $("mask-canvas").classList.toggle("disabled", mode !== "inpaint");
  excludeHiresOrRefiner();
  renderKept();
  renderScripts();
  showUnitStates();                         // controlnet.js: a unit without its own picture takes the initial image
}

// ---------------------------------------------------------------- scripts

// The Script list of the tab (A1111's: img2img's scripts in the inpaint tab too), the chosen one kept where the tab
// has it, and the X/Y/Z type lists of the tab's axes, each keeping its axis by name (the tabs number them apart)
function renderScripts() {
  if (!state.scripts) return;
  const tab = state.scripts[state.mode === "txt2img" ? "txt2img" : "img2img"];
  fillSelect($("script"), tab.scripts.map((s) => ({ label: s.title, value: s.title })), { blank: "None" });
  for (const letter of ["x", "y", "z"]) {
    const select = $(`xyz_${letter}_type`);
    const label = select.selectedOptions[0]?.text || select.dataset.default;
    select.replaceChildren(...tab.axes.map((a) => new Option(a.label, a.index, a.label === select.dataset.default)));
    selectMatching(select, label);
  }
  showScriptControls();
}

// The tab's scripts and X/Y/Z axes (`GET /api/scripts`), their choices the server's as they now are
async function loadScripts() {
  state.scripts = await api("/api/scripts");
  renderScripts();
}

function showScriptControls() {
  for (const panel of document.querySelectorAll(".script-controls")) panel.hidden = panel.dataset.script !== $("script").value;
  renderAxisChoices();
}

// A value as A1111's csv reads it from an X/Y/Z values box: quoted where it holds a comma or a quote
const csvValue = (value) => (/[",]/.test(value) ? `"${value.replaceAll('"', '""')}"` : value);

// A1111's value dropdown and fill button (its 📒) beside the values box of an X/Y/Z axis with choices (Checkpoint
// name, VAE, Styles, Sampler, Schedule type, ...: the axis's `values` in `GET /api/scripts`, the server's): a value
// picked joins the box's values, Fill puts every one there; the box stays free text, typed into for every axis
function setupAxisChoices() {
  for (const letter of ["x", "y", "z"]) {
    const box = $(`xyz_${letter}_values`);
    const choice = document.createElement("select");
    choice.id = `xyz_${letter}_choice`;
    choice.setAttribute("aria-label", `${letter.toUpperCase()} value to add`);
    choice.addEventListener("change", () => { addAxisValues(box, [choice.value]); choice.value = ""; });
    const fill = makeButton("Fill", "axis-fill", () => { box.value = ""; addAxisValues(box, axisValues(letter)); },
      `Fill the ${letter.toUpperCase()} values with every choice`);
    fill.id = `xyz_${letter}_fill`;
    const row = document.createElement("span");
    row.id = `xyz_${letter}_choices`;
    row.className = "axis-choices";
    row.hidden = true;
    row.append(choice, fill);
    box.after(row);
    $(`xyz_${letter}_type`).addEventListener("change", renderAxisChoices);
  }
}

// The values the chosen axis of `letter` offers (none: a free-text axis)
function axisValues(letter) {
  if (!state.scripts) return [];
  const axis = state.scripts[state.mode === "txt2img" ? "txt2img" : "img2img"].axes
    .find((a) => a.index === Number($(`xyz_${letter}_type`).value));
  return (axis && axis.values) || [];
}

// `values` after those typed in `box`, ", " between them
function addAxisValues(box, values) {
  box.value = [box.value.trim(), ...values.filter(Boolean).map(csvValue)].filter(Boolean).join(", ");
}

// Each axis's value dropdown: its axis's choices, shown only for an axis that has some
function renderAxisChoices() {
  for (const letter of ["x", "y", "z"]) {
    const choices = $(`xyz_${letter}_choices`);
    if (!choices) continue;
    const values = axisValues(letter);
    fillSelect($(`xyz_${letter}_choice`), values.map((v) => ({ label: v, value: v })), { blank: "add a value" });
    $(`xyz_${letter}_choice`).value = "";
    choices.hidden = !values.length;
  }
}

function scriptArg(spec) {
  if ("value" in spec) return spec.value;
  if (spec.type === "directions") {
    return [...document.querySelectorAll(`input[name="${spec.id}"]`)].filter((box) => box.checked).map((box) => box.value);
  }
  if (spec.type === "bool") return $(spec.id).checked;
  if (spec.type === "text") return $(spec.id).value;
  const value = numberField(spec.id, { integer: spec.type === "int" });
  return value ?? Number(pageDefault(spec.id));
}

// The chosen script's `script_name` and `script_args` (none for None)
function scriptRequest() {
  const name = $("script").value;
  return name ? { script_name: name, script_args: SCRIPT_ARGS[name].map(scriptArg) } : {};
}

// Set a script control to `value` (null: left as it is); a list takes an option by its value or its text (an X/Y/Z
// type by its index, a picture's by its label). Returns whether the control could take it.
function setScriptArg(spec, value) {
  if ("value" in spec || value === undefined || value === null) return true;
  if (spec.type === "directions") {
    for (const box of document.querySelectorAll(`input[name="${spec.id}"]`)) box.checked = value.includes(box.value);
  } else if (spec.type === "bool") {
    $(spec.id).checked = Boolean(value);
  } else if ($(spec.id).tagName === "SELECT") {
    return selectMatching($(spec.id), value);
  } else {
    $(spec.id).value = String(value);
  }
  return true;
}

// A reused job's or a dropped picture's script and its arguments (A1111's order; null: the form's own; past the end
// of a job's list: the script's defaults, `GET /api/scripts`, as A1111 fills them); settings without one choose None
// (as A1111's paste of a text without `Script`). A script the tab does not offer, or an argument its controls cannot
// take (an X/Y/Z axis sdlab does not draw), is named in the notice and leaves None.
function fillScript(settings, unknown) {
  const name = settings.script_name || "";
  if (!selectMatching($("script"), name)) {
    unknown.push(`script "${name}" (not in this tab)`);
    $("script").value = "";
  } else if (name) {
    const title = $("script").value;
    const defaults = state.scripts[state.mode === "txt2img" ? "txt2img" : "img2img"].scripts
      .find((s) => s.title === title).args.map((a) => a.value);
    const sent = settings.script_args || [];
    const args = SCRIPT_ARGS[title].map((spec, index) => [spec, index < sent.length ? sent[index] : defaults[index]]);
    const refused = args.filter(([spec, value]) => !setScriptArg(spec, value))
      .map(([spec, value]) => `${$(spec.id).labels[0].textContent} "${value}"`);
    if (title === "X/Y/Z plot" && args.at(-1)[1] === false) fillDropdowns(args);
    if (refused.length) {
      unknown.push(`script "${name}" (${refused.join(", ")} not here)`);
      $("script").value = "";
    }
  }
  showScriptControls();
}

// An X/Y/Z plot's dropdown lists (its csv_mode off) in the values boxes of the axes that read them, those with
// choices (`GET /api/scripts`; A1111's and the server's rule), each value quoted as A1111's csv reads it; the other
// axes keep their text
function fillDropdowns(args) {
  const axes = state.scripts[state.mode === "txt2img" ? "txt2img" : "img2img"].axes;
  args.forEach(([spec, value], index) => {
    const axis = spec.into && axes.find((a) => a.index === Number(args[index - 2][1]));
    if (axis && axis.choices) $(spec.into).value = (Array.isArray(value) ? value : []).map((v) => csvValue(String(v))).join(", ");
  });
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the file is not an image the browser can read"));
    image.src = url;
  });
}

async function setInitImage(dataUrl) {
  showError("");                             // a picture given again ends the error of the last one
  const image = await loadImage(dataUrl);
  const initCanvas = $("init-canvas");
  const maskCanvas = $("mask-canvas");
  initCanvas.width = maskCanvas.width = image.naturalWidth;
  initCanvas.height = maskCanvas.height = image.naturalHeight;
  initCanvas.getContext("2d").drawImage(image, 0, 0);
  state.initImage = dataUrl;
  clearMask();
  $("canvas-stack").hidden = false;
  $("init-placeholder").hidden = true;
}

// The painted mask's 2D context: read back (getImageData) on each mask file loaded and each job sent, so kept in
// memory rather than on the GPU (`willReadFrequently`, which only the canvas's first getContext sets)
const maskContext = () => $("mask-canvas").getContext("2d", { willReadFrequently: true });

function clearMask() {
  const canvas = $("mask-canvas");
  maskContext().clearRect(0, 0, canvas.width, canvas.height);
  state.maskPainted = false;
  state.maskFile = null;
}

// A mask file (A1111's Inpaint upload), white is repainted: the file itself is sent, read by the server as an
// API mask (a picture with transparency by its alpha, else its grey levels; blurred at its own size, then
// resized by the resize mode). The canvas shows it stretched to the image as the painted layer's coverage (a
// transparent picture's alpha > 128, as an RGBA file's, else PIL's luma); painting over it sends the canvas.
async function loadMask(dataUrl) {
  if (!state.initImage) throw new ApiError("choose the initial image first, then its mask");
  const image = await loadImage(dataUrl);
  const canvas = $("mask-canvas");
  const ctx = maskContext();
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const rgba = pixels.data;
  const transparent = rgba.some((value, i) => i % 4 === 3 && value < 255);
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(MASK_COLOUR.slice(i, i + 2), 16));
  for (let i = 0; i < rgba.length; i += 4) {
    rgba[i + 3] = transparent ? (rgba[i + 3] > 128 ? 255 : 0)
      : (rgba[i] * 19595 + rgba[i + 1] * 38470 + rgba[i + 2] * 7471 + 0x8000) >> 16;
    [rgba[i], rgba[i + 1], rgba[i + 2]] = [r, g, b];
  }
  ctx.putImageData(pixels, 0, 0);
  state.maskPainted = true;
  state.maskFile = dataUrl;
}

function setupMaskPainting() {
  const canvas = $("mask-canvas");
  let last = null;
  const point = (event) => {
    const rect = canvas.getBoundingClientRect();
    const scale = canvas.width / rect.width;
    return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * scale, scale };
  };
  const stroke = (from, to) => {
    const ctx = maskContext();
    ctx.strokeStyle = ctx.fillStyle = MASK_COLOUR;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.lineWidth = Math.max(1, Number($("brush-size").value) * to.scale);
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x + 0.01, to.y);
    ctx.stroke();
    state.maskPainted = true;
    state.maskFile = null;
  };
  canvas.addEventListener("pointerdown", (event) => {
    if (state.mode !== "inpaint") return;
    event.preventDefault();
    canvas.setPointerCapture?.(event.pointerId);
    last = point(event);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!last) return;
    const next = point(event);
    stroke(last, next);
    last = next;
  });
  const end = () => { last = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  canvas.addEventListener("lostpointercapture", end);
}

// The mask as a PNG data URL at the image's size: white where painted (repaint), black elsewhere;
// the painted layer's coverage (alpha) is the grey level, so a stroke's soft edge stays soft.
function maskDataUrl() {
  const painted = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = painted.width;
  out.height = painted.height;
  const pixels = maskContext().getImageData(0, 0, painted.width, painted.height);
  const rgba = pixels.data;
  for (let i = 0; i < rgba.length; i += 4) {
    rgba[i] = rgba[i + 1] = rgba[i + 2] = rgba[i + 3];
    rgba[i + 3] = 255;
  }
  out.getContext("2d").putImageData(pixels, 0, 0);
  return out.toDataURL("image/png");
}

const base64Of = (dataUrl) => String(dataUrl).replace(/^data:[^,]*,/, "");

function setToggle(id, on) {
  $(id).checked = on;
  $(TOGGLES[id]).hidden = !on;
  excludeHiresOrRefiner();
}

// A slider and the value shown beside it (<output id="ID-value">)
function showSliderValue(id) {
  $(`${id}-value`).textContent = Number($(id).value).toFixed(2);
}

function setSlider(id, value) {
  if (value === undefined || value === null) return;
  setField(id, value);
  showSliderValue(id);
}

// The Image CFG Scale slider on at `scale` (null: as it is), or off with its None ticked (no image guidance)
function setImageGuidance(on, scale = null) {
  $("image_cfg_none").checked = !on;
  $("image_cfg_scale").disabled = !on;
  if (on) setSlider("image_cfg_scale", scale);
}

// ---------------------------------------------------------------- request

// A number box's label and text; a box holding text that is not a number ("abc", "1e400") reads as "": say
// so, never send the default
function typedNumber(id) {
  const field = $(id);
  const label = field.labels[0]?.textContent || field.getAttribute("aria-label") || id;
  if (field.validity && field.validity.badInput) throw new ApiError(`${label}: the text typed is not a number`);
  return { label, raw: field.value.trim() };
}

function numberField(id, { integer = false } = {}) {
  const { label, raw } = typedNumber(id);
  if (raw === "") return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new ApiError(`${label}: "${raw}" is not ${integer ? "a whole number" : "a number"}`);
  }
  return value;
}

// A seed box's value (undefined when empty): a number while JavaScript holds it exactly, else its digits as
// text, which the native API takes too, so a seed past 2^53 is sent as typed
function seedField(id) {
  const { label, raw } = typedNumber(id);
  if (raw === "") return undefined;
  if (!/^-?\d+$/.test(raw) || BigInt(raw) < MIN_SEED || BigInt(raw) > MAX_SEED) {
    throw new ApiError(`${label}: "${raw}" is not a seed: a whole number from ${MIN_SEED} to ${MAX_SEED} (-1: random)`);
  }
  const value = Number(raw);
  return Number.isSafeInteger(value) ? value : BigInt(raw).toString();
}

// A picture's side in pixels (undefined when empty): a multiple of 8, as the model draws them and A1111's
// sliders step (the server would round it down, as `sdlab txt2img` does with a warning); 0 and less are the
// server's to refuse
function sideField(id) {
  const value = numberField(id, { integer: true });
  if (value > 0 && value % 8) {
    const below = value - (value % 8);
    throw new ApiError(`${typedNumber(id).label}: ${value} is not a multiple of 8 (pictures are drawn in steps of `
      + `8 pixels); use ${below ? `${below} or ` : ""}${below + 8}`);
  }
  return value;
}

// The page's default of the field `id`: a box's value attribute, a list's option marked selected (else its first)
function pageDefault(id) {
  const field = $(id);
  if (field.tagName !== "SELECT") return field.defaultValue;
  return ([...field.options].find((option) => option.defaultSelected) || field.options[0])?.value;
}

// `value`, or the page's default for the field `id` when there is none
const orDefault = (id, value) => value ?? pageDefault(id);

// A number box's value, or the page's default for it when it is empty
function numberOrDefault(id, options) {
  return Number(orDefault(id, numberField(id, options)));
}

// The hires fix (a second pass at a larger size): resize 0 = from "Upscale by", hires steps 0 = the first pass's
function hiresRequest() {
  return {
    hr_upscaler: $("hr_upscaler").value || undefined,
    hr_convention: COMFY_UPSCALE_METHODS.includes($("hr_upscaler").value) ? "comfyui" : undefined,
    hr_scale: numberOrDefault("hr_scale"),
    hr_width: Number(orDefault("hr_width", sideField("hr_width"))),
    hr_height: Number(orDefault("hr_height", sideField("hr_height"))),
    hr_steps: numberOrDefault("hr_steps", { integer: true }),
    hr_denoise: Number($("hr_denoise").value),
    hr_sampler: $("hr_sampler").value || undefined,            // blank: the first pass's (A1111's "Use same ...")
    hr_schedule: $("hr_schedule").value || undefined,
    hr_prompt: $("hr_prompt").value || undefined,
    hr_negative_prompt: $("hr_negative_prompt").value || undefined,
  };
}

function variationRequest() {
  return { subseed: seedField("subseed") ?? -1, subseed_strength: Number($("subseed_strength").value),
    seed_resize_from_w: numberOrDefault("seed_resize_from_w", { integer: true }),
    seed_resize_from_h: numberOrDefault("seed_resize_from_h", { integer: true }) };
}

// An option box (OPTION_BOXES): a fieldset whose legend's tick box shows its settings, a labelled control each
function optionBox(box) {
  const control = (field, id) => (field.choices ? choiceSelect(id, field.choices, String(field.value))
    : element("input", { type: "number", id, defaultValue: field.value, min: field.min, max: field.max,
      step: field.step }));
  return element("fieldset", { className: "toggle-box" }, [
    element("legend", {}, [element("label", { className: "toggle", title: box.title }, [
      element("input", { type: "checkbox", id: box.id }), ` ${box.name}`])]),
    element("div", { id: `${box.id}-options`, className: "grid2", hidden: true }, box.fields.map((field) =>
      labelled(`${box.id}_${field.key}`, field.label, control(field, `${box.id}_${field.key}`), field.title))),
  ]);
}

// The boxes in place of the page's #option-boxes (controlnet.js's element builders)
function buildOptionBoxes() {
  $("option-boxes").replaceWith(...OPTION_BOXES.map(optionBox));
}

// A ticked box's setting (the native API's object of its id): its number boxes' and selects' values
function optionBoxRequest(box) {
  return Object.fromEntries(box.fields.map((field) => {
    const id = `${box.id}_${field.key}`;
    if (!field.choices) return [field.key, numberField(id, { integer: field.integer })];
    return [field.key, typeof field.value === "number" ? Number($(id).value) : $(id).value];
  }));
}

// Settings with the box's object tick it and fill it (a field they lack: the API's default); without, the box is
// unticked (the values stay); a choice the select lacks is named in `unknown`
function fillOptionBox(box, settings, unknown) {
  const setting = settings[box.id];
  setToggle(box.id, Boolean(setting));
  if (!setting) return;
  for (const field of box.fields) {
    const id = `${box.id}_${field.key}`;
    if (!field.choices) setField(id, setting[field.key] ?? field.value);
    else if (!selectMatching($(id), String(setting[field.key] ?? field.value))) {
      unknown.push(`${box.name} ${field.key} "${setting[field.key]}"`);
    }
  }
}

// The painted mask and the inpaint box: A1111's Mask blur, Mask mode, Masked content and Inpaint area (Only
// masked, with its padding)
function inpaintRequest() {
  return {
    mask_image: base64Of(state.maskFile ?? maskDataUrl()),
    mask_blur: numberField("mask_blur") ?? 0,
    invert_mask: $("invert_mask").value === "true",
    inpaint_fill: $("inpaint_fill").value,
    inpaint_only_masked: $("inpaint_only_masked").value === "true",
    inpaint_padding: numberOrDefault("inpaint_padding", { integer: true }),
  };
}

// An SDXL refiner (a model of the list) that finishes the steps after "Switch at" of them, by the handoff
// rule of the job or PNG the settings came from (A1111's or diffusers')
function refinerRequest() {
  return { refiner: $("refiner").value, refiner_switch: numberOrDefault("refiner_switch"),
           refiner_convention: state.refinerConvention };
}

// The hires fix does not run with a refiner: while one is on, the other shows its hint and cannot be ticked
// (txt2img's and img2img's hires fix: the inpaint tab draws without it)
function excludeHiresOrRefiner() {
  blockToggle("enable_refiner", state.mode !== "inpaint" && $("enable_hr").checked);
  blockToggle("enable_hr", $("enable_refiner").checked);
}

// A box blocked by the other: its hint shows, and unticked it is disabled (ticked, it stays free to untick)
function blockToggle(id, blocked) {
  $(id).disabled = blocked && !$(id).checked;
  $(`${id}-hint`).hidden = !blocked;
}

// The request the form makes. The prompt goes as typed: its `<lora:...>` tags (A1111's syntax, one or two
// weights) are the server's to read, as `sdlab txt2img` reads them.
function collectRequest() {
  const body = {
    mode: state.mode,
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    steps: numberField("steps", { integer: true }),
    cfg_scale: numberField("cfg_scale"),
    pag_scale: numberOrDefault("pag_scale"),
    seed: seedField("seed") ?? -1,
    width: sideField("width"),
    height: sideField("height"),
    batch_size: numberField("batch_size", { integer: true }),
    batch_count: numberField("batch_count", { integer: true }),
    clip_skip: numberOrDefault("clip_skip", { integer: true }),
    tiling: $("tiling").checked,
    token_merging_ratio: numberOrDefault("token_merging_ratio"),
    rng: $("rng").value,
    loras: state.loras.map((l, index) => ({ name: l.name, weight: loraWeight(`lora-weight-${index}`) })),
  };
  if ($("model").value) body.model = $("model").value;   // the checkpoint's title, as /sdapi/v1/sd-models names it
  if ($("vae").value && $("vae").value !== "Automatic") body.vae = $("vae").value;
  if ($("sampler").value) body.sampler = $("sampler").value;
  if (state.styles.length) body.styles = [...state.styles];
  if ($("schedule").value) body.schedule = $("schedule").value;
  if ($("seed-extra").checked) Object.assign(body, variationRequest());
  for (const box of OPTION_BOXES) if ($(box.id).checked) body[box.id] = optionBoxRequest(box);
  const hires = state.mode !== "inpaint" && $("enable_hr").checked;
  if (hires) Object.assign(body, hiresRequest());
  if (hires && state.mode === "img2img" && body.hr_convention !== "comfyui") {
    throw new ApiError("img2img's hires fix is ComfyUI's two-pass graph: choose a ComfyUI upscaler, or untick "
      + "Hires. fix (A1111's hires fix is txt2img's)");
  }
  if ($("enable_refiner").checked && $("refiner").value) Object.assign(body, refinerRequest());
  Object.assign(body, keptRequest(), scriptRequest());
  if (!hires) delete body.token_merging_ratio_hr;   // kept for a hires pass only (the server refuses it alone)
  if (body.hr_scale !== undefined && body.refiner) {
    throw new ApiError("the hires fix does not run with an SDXL refiner: untick Hires. fix or Refiner");
  }
  if (state.mode !== "txt2img") {
    if (!state.initImage) throw new ApiError(`${state.mode} needs an initial image: choose or drop one`);
    body.init_image = base64Of(state.initImage);
    body.strength = Number($("strength").value);
    body.image_cfg_scale = $("image_cfg_none").checked ? "none"  // no image guidance; read by edit models alone
      : Number($("image_cfg_scale").value);
    body.resize_mode = $("resize_mode").value;
  }
  if (state.mode === "inpaint") {
    if (!state.maskPainted) throw new ApiError("inpaint needs a mask: paint the area to repaint on the image");
    Object.assign(body, inpaintRequest());
  }
  Object.assign(body, controlRequest());    // controlnet.js: the enabled ControlNet units and IP-Adapter
  for (const key of Object.keys(body)) if (body[key] === undefined) delete body[key];
  return body;
}

// The `KEPT` settings, but for inpainting not LCM's img2img steps, which do not inpaint: the server draws a full
// LCM model's inpainting under diffusers' rule, as it does when none is sent
function keptRequest() {
  const kept = { ...state.kept };
  if (state.mode === "inpaint" && kept.img2img_convention === "lcm") delete kept.img2img_convention;
  return kept;
}

// Keep the settings' `KEPT` fields that are not the API's (`state.kept`)
function keepSettings(settings) {
  state.kept = Object.fromEntries(Object.entries(KEPT)
    .filter(([key, { none }]) => settings[key] != null && !sameValue(settings[key], none))
    .map(([key]) => [key, settings[key]]));
  renderKept();
}

// Let the kept settings that go with the control `id` go (it changed)
function dropKept(id) {
  for (const key of Object.keys(state.kept)) if (KEPT[key].with.includes(id)) delete state.kept[key];
  renderKept();
}

// A kept value as the infotext writes it: the entry's own text (`shown`), a boolean as Python's, a list as JSON
function keptText(key, value) {
  if (KEPT[key].shown) return KEPT[key].shown;
  if (typeof value === "boolean") return value ? "True" : "False";
  return typeof value === "object" ? JSON.stringify(value) : value;
}

// The kept settings the tab sends (`keptRequest`), each a chip "Name: value" with a button that removes it; the line
// hides when there are none
function renderKept() {
  const list = $("kept-list");
  list.replaceChildren();
  for (const [key, value] of Object.entries(keptRequest())) {
    const item = document.createElement("li");
    item.dataset.key = key;
    const label = `${KEPT[key].name}: ${keptText(key, value)}`;
    const name = document.createElement("span");
    name.textContent = label;
    item.append(name, makeButton("\u00d7", "remove-kept", () => { delete state.kept[key]; renderKept(); }, `Remove ${label}`));
    list.append(item);
  }
  $("kept").hidden = !list.children.length;
}

function setField(id, value) {
  if (value === undefined || value === null) return;
  $(id).value = value;
}

// Whether request-style settings draw with the hires fix (A1111: Hires upscale, or a Hires resize side)
const usesHires = (s) => s.hr_scale != null || Boolean(s.hr_width) || Boolean(s.hr_height);

// Whether the tab draws the settings' hires fix: txt2img both conventions, img2img ComfyUI's two-pass graph alone
// (`hiresRequest`), inpaint none
const hiresOnThisTab = (s) => usesHires(s)
  && (state.mode === "txt2img" || (state.mode === "img2img" && s.hr_convention === "comfyui"));

// Fill the form from request-style settings ({prompt, negative_prompt, steps, sampler, ...}).
// Returns the names of settings that did not fit a list (unknown sampler, schedule, model or hires upscaler).
function fillForm(settings) {
  const unknown = [];
  state.loras = [];
  if (Array.isArray(settings.loras)) {
    for (const l of settings.loras) if (l && l.name) addLora(l.name, Number(l.weight ?? 1));
  }
  setField("prompt", settings.prompt);
  renderLoras();
  setField("negative_prompt", settings.negative_prompt ?? "");
  for (const id of ["steps", "cfg_scale", "seed", "width", "height", "clip_skip", "pag_scale", "token_merging_ratio"]) {
    setField(id, orDefault(id, settings[id]));           // settings without one were drawn with the default
  }
  setField("batch_size", settings.batch_size);
  setField("batch_count", settings.batch_count);           // a picture has none (A1111 writes none): the box stays
  $("tiling").checked = settings.tiling === true;          // settings without it were drawn without
  const rng = settings.rng ?? "CPU";                       // a record without it: sdlab's default drew it
  if (!selectMatching($("rng"), rng)) unknown.push(`RNG "${rng}"`);
  setSlider("strength", settings.strength);
  if (settings.image_cfg_scale === "none") setImageGuidance(false);   // an edit model's: drawn without image guidance
  else if (settings.image_cfg_scale != null) setImageGuidance(true, settings.image_cfg_scale);   // else it stays (A1111)
  fillImageOptions(settings, unknown);
  fillVariation(settings);
  for (const box of OPTION_BOXES) fillOptionBox(box, settings, unknown);
  fillControls(settings, unknown);                         // controlnet.js
  const hiresHere = hiresOnThisTab(settings);
  if (hiresHere) fillHires(settings, unknown);
  else setToggle("enable_hr", false);
  if (usesHires(settings) && !hiresHere) {
    unknown.push(state.mode === "inpaint" ? "the hires fix (not on the inpaint tab)"
      : "A1111's hires fix (txt2img's: the img2img tab draws ComfyUI's two-pass graph alone)");
  }
  fillRefiner(settings, unknown);
  fillStyles(settings, unknown);
  fillScript(settings, unknown);
  keepSettings(settings);
  if (settings.sampler !== undefined && !selectMatching($("sampler"), settings.sampler ?? "")) unknown.push(`sampler "${settings.sampler}"`);
  if (settings.schedule !== undefined && !selectMatching($("schedule"), settings.schedule ?? "")) unknown.push(`schedule "${settings.schedule}"`);
  markMissingModel("model", settings.model && !selectMatching($("model"), settings.model) ? settings.model : null);
  if (!selectMatching($("vae"), settings.vae ?? "Automatic")) unknown.push(`VAE "${settings.vae}"`);
  return unknown;
}

// The init image's Resize mode (kept when the settings have none: A1111 records none) and the inpaint box,
// whose settings left out take the page's defaults (A1111 records only those that differ)
function fillImageOptions(settings, unknown) {
  const lists = { resize_mode: settings.resize_mode, inpaint_fill: orDefault("inpaint_fill", settings.inpaint_fill),
    invert_mask: String(settings.invert_mask === true), inpaint_only_masked: String(settings.inpaint_only_masked === true) };
  for (const [id, wanted] of Object.entries(lists)) {
    if (wanted != null && !selectMatching($(id), wanted)) unknown.push(`${$(id).labels[0].textContent} "${wanted}"`);
  }
  // a picture's Mask blur, or 0 for an img2img / inpaint picture without one (A1111 writes it only above 0: it drew
  // with none); a txt2img job (its request's 0 unused) or picture without one leaves the box as it is
  const fromImage = settings.strength != null && !usesHires(settings);
  if (settings.mode !== "txt2img") setField("mask_blur", settings.mask_blur ?? (fromImage ? 0 : undefined));
  setField("inpaint_padding", orDefault("inpaint_padding", settings.inpaint_padding));
}

// A varied or resized seed ticks "Variation seed" and fills it (an unset resize side: 0, off); without one, the
// box is unticked (the values stay)
function fillVariation(settings) {
  const resized = Number(settings.seed_resize_from_w) > 0 && Number(settings.seed_resize_from_h) > 0;
  const varied = Number(settings.subseed_strength) > 0;
  setToggle("seed-extra", varied || resized);
  if (!varied && !resized) return;
  setField("subseed", settings.subseed);
  setSlider("subseed_strength", settings.subseed_strength ?? 0);
  setField("seed_resize_from_w", resized ? settings.seed_resize_from_w : 0);
  setField("seed_resize_from_h", resized ? settings.seed_resize_from_h : 0);
}

// Settings with a refiner tick "Refiner" and fill it, keeping their handoff rule; without one, the box is
// unticked (the values stay). Settings with the hires fix too tick the hires fix only (they cannot go together).
function fillRefiner(settings, unknown) {
  const withHires = usesHires(settings);
  setToggle("enable_refiner", Boolean(settings.refiner) && !withHires);
  state.refinerConvention = settings.refiner_convention ?? "diffusers";
  markMissingModel("refiner", null);
  if (!settings.refiner) return;
  if (withHires) unknown.push(`refiner "${settings.refiner}" (not with the hires fix)`);
  setField("refiner_switch", orDefault("refiner_switch", settings.refiner_switch));
  if (!selectMatching($("refiner"), settings.refiner) && !withHires) markMissingModel("refiner", settings.refiner);
}

// Tick "Hires. fix" and fill it; a field the settings leave out takes the page's default (A1111's)
function fillHires(settings, unknown) {
  setToggle("enable_hr", true);
  for (const id of ["hr_scale", "hr_width", "hr_height", "hr_steps"]) setField(id, orDefault(id, settings[id]));
  setSlider("hr_denoise", orDefault("hr_denoise", settings.hr_denoise));
  setField("hr_prompt", settings.hr_prompt ?? "");
  setField("hr_negative_prompt", settings.hr_negative_prompt ?? "");
  for (const [id, name] of [["hr_sampler", "hires sampler"], ["hr_schedule", "hires schedule"]]) {
    if (!selectMatching($(id), settings[id] ?? "")) unknown.push(`${name} "${settings[id]}"`);
  }
  const upscaler = settings.hr_upscaler ?? $("hr_upscaler").options[0]?.value;
  if (!selectMatching($("hr_upscaler"), upscaler)) unknown.push(`hires upscaler "${upscaler}"`);
}

// The settings of request-style `s` the form has no control for, as the notice names them: the form draws
// without them. `s` is a job's `request` (Reuse) or a PNG's settings (`readParameters`), the same rule for
// both: every field that is not a control of the form (by its id) nor `KEPT_APART`, unless its value changes
// nothing (`NOT_IN_FORM`), then the PNG's labels the server's reader leaves unread.
function settingsNotInForm(s) {
  const notes = [];
  for (const [key, value] of Object.entries(s)) {
    if (KEPT_APART.has(key) || $("settings").contains(document.getElementById(key))) continue;
    const known = NOT_IN_FORM[key];
    if (known ? sameValue(value, known.none) || known.unused?.(s) : isEmpty(value)) continue;
    notes.push(`${known?.name ?? key} ${typeof value === "object" ? JSON.stringify(value) : value}`);
  }
  return [...notes, ...(s.unread || [])];
}

const isEmpty = (value) => value == null || value === false || value === 0 || value === ""
  || (Array.isArray(value) && !value.length);
const sameValue = (a, b) => JSON.stringify(a ?? null) === JSON.stringify(b ?? null) || Number(a) === b;

// Fill the form from request-style settings (Reuse, a dropped PNG); returns what it could not take.
function applySettings(settings) {
  return [...fillForm(settings), ...settingsNotInForm(settings)];
}

const notAvailable = (missing) => `not available here: ${missing.join(", ")} (the form draws without them)`;

// The lists of model files that filled settings name (by the list's id): the notice's name of each and its label
const MODEL_LISTS = { model: { name: "model", label: "Model" }, refiner: { name: "refiner", label: "Refiner model" } };

// A model the filled settings name that its list lacks (its file renamed or removed since): the form keeps the model
// chosen, outlines the list (the Model list names the missing one beside it) until another is picked (null: none)
function markMissingModel(id, name) {
  state.missingModels[id] = name;
  if (name) $(id).setAttribute("aria-invalid", "true");
  else $(id).removeAttribute("aria-invalid");
  if (id !== "model") return;
  $("model-missing").textContent = name ? `"${name}" is missing: pick a model` : "";
  $("model-missing").hidden = !name;
}

const missingModelLists = () => Object.keys(MODEL_LISTS).filter((id) => state.missingModels[id]);

// The notice of settings that filled the form (`done`: what filled it): the models they name that are missing, then
// what the form has no control for (`missing`: applySettings'); "" when nothing is to be said and `quiet`.
// A missing model sends the keyboard to its list (the Model list's first).
function filledNotice(done, missing, { quiet = false } = {}) {
  const notes = missingModelLists().map((id) => `${MODEL_LISTS[id].name} "${state.missingModels[id]}" is not on this `
    + `server (renamed or removed? Refresh rescans the models folder): the form draws with "${$(id).value}" until you `
    + `pick another under ${MODEL_LISTS[id].label}`);
  if (notes.length) $(missingModelLists()[0]).focus();
  if (missing.length) notes.push(notAvailable(missing));
  return notes.length || !quiet ? [done, ...notes].join("; ") : "";
}

// ---------------------------------------------------------------- jobs

async function generate() {
  if ($("generate").disabled) return;        // the last request is still being sent (Ctrl+Enter held)
  showError("");
  showNotice("");
  let body;
  try {
    body = collectRequest();
  } catch (err) {
    showError(err.message);
    return;
  }
  const button = $("generate");
  button.disabled = true;
  try {
    const job = await api("/api/jobs", { method: "POST", body });
    state.submitted.add(job.id);
    rememberSubmitted();
    bringOutputIntoView();
    if (!state.follow) {                       // nothing running: follow this one from its start
      state.shownJob = job.id;
      setProgress(0, 1, queuedText(job.position));
      followJob(job.id);
    }
    await refreshJobs(true);
  } catch (err) {
    showError(err.message);
  } finally {
    button.disabled = false;
  }
}

// The output panel's progress row, once a job is queued, in view: in one column (a phone's window) the panel is under
// the long form, the Generate button far above or below it; side by side it is always in view (sticky) and the page
// stays where it is
function bringOutputIntoView() {
  const row = document.querySelector(".output .progress-row").getBoundingClientRect();
  if (row.top < 0 || row.bottom > window.innerHeight) document.querySelector(".output").scrollIntoView({ block: "start" });
}

// The form at `element`, once a gallery card's Reuse or img2img has filled it, in view, the keyboard at its `field`:
// in one column (a phone's window) the gallery is under the long form, the change far above the card (and Tab from
// the card's button would go back down to it); side by side the form is beside the gallery and neither moves
function showFormAt(element, field) {
  const oneColumn = $("settings").getBoundingClientRect().bottom <= document.querySelector(".output").getBoundingClientRect().top;
  if (!oneColumn) return;
  element.scrollIntoView({ block: "start" });
  field.focus({ preventScroll: true });
}

// `position`: jobs waiting ahead of this one (0 = it runs next)
const queuedText = (position) => (position == null ? "Queued" : position === 0 ? "Queued (next)" : `Queued (${position} ahead)`);

function setProgress(value, max, text) {
  $("progress").max = max || 1;
  $("progress").value = value || 0;
  $("progress-text").textContent = text;
}

function parseEventData(event) {
  try { return event.data ? JSON.parse(event.data) : {}; } catch (_) { return {}; }
}

// The page follows one of its own jobs' event stream at a time: its running job, else its next queued one.
// (A browser opens at most six connections to a server; one stream per queued job would use them up.)
function followJob(id) {
  if (state.follow && state.follow.id === id) return;
  stopFollowing();
  const source = new EventSource(`/api/jobs/${encodeURIComponent(id)}/events`);
  state.follow = { id, source };
  const handle = (type, data) => {
    if (!state.follow || state.follow.id !== id) return;
    if (type === "started") {
      state.shownJob = id;
      state.follow.batches = batchCount(data.request);
      setRunning(id);
      setProgress(0, data.steps || 1, "Started");
    } else if (type === "step") {
      state.shownJob = id;
      setProgress(data.i, data.n, `${stepText(data.i, data.n, state.follow.batches)}${timeLeft(id, data.i, data.n)}`);
      if (data.preview) {
        $("preview").dataset.count = Number($("preview").dataset.count || 0) + 1;   // previews shown so far
        $("preview").src = data.preview;
        $("preview").hidden = false;
        $("results").replaceChildren();
      }
    } else if (TERMINAL_EVENTS.has(type)) {
      stopFollowing();
      jobEnded(id);
    }
  };
  for (const type of ["queued", "started", "step", ...TERMINAL_EVENTS]) {
    source.addEventListener(type, (event) => handle(type, parseEventData(event)));
  }
  source.onmessage = (event) => {          // servers that send unnamed events with a type field
    const data = parseEventData(event);
    const type = data.type || data.event || data.status;
    if (type) handle(type, data.data || data);
  };
  source.onerror = () => {                 // the stream dropped: the job list (polled) says the rest
    if (state.follow && state.follow.id === id) {
      stopFollowing();
      setTimeout(() => refreshJobs(true), 1000);
    }
  };
}

// A job's batch count (A1111's; its request records it above 1)
const batchCount = (request) => (request && request.batch_count) || 1;

// "Step i / n" of the job's steps, or for a job of several batches (A1111's Batch count) "Batch b / N · Step s / m",
// the batch being drawn and its steps (each batch runs n / N of them; a skipped batch's count as run)
function stepText(i, n, batches) {
  if (!(batches > 1) || !n) return `Step ${i} / ${n}`;
  const perBatch = n / batches;
  const batch = Math.min(batches, Math.floor(Math.max(i - 1, 0) / perBatch) + 1);
  return `Batch ${batch} / ${batches} \u00b7 Step ${i - (batch - 1) * perBatch} / ${perBatch}`;
}

// " · 12 s left" from the pace of the steps seen so far ("" until two steps are in)
function timeLeft(id, i, n) {
  const now = performance.now();
  if (!state.clock || state.clock.id !== id) state.clock = { id, i, t: now };
  const { i: i0, t: t0 } = state.clock;
  if (i <= i0) return "";
  const seconds = ((now - t0) / 1000 / (i - i0)) * (n - i);
  return seconds >= 1 ? ` \u00b7 ${Math.round(seconds)} s left` : "";
}

function stopFollowing() {
  if (state.follow) state.follow.source.close();
  state.follow = null;
}

// A job the page waited for has ended: show it if it is the one on screen, then follow the next.
async function jobEnded(id) {
  let job = null;
  try { job = await api(`/api/jobs/${encodeURIComponent(id)}`); } catch (err) { showError(err.message); }
  // unread (a server stopping ends its jobs as it goes): kept, so the poll shows it once the server answers again
  if (job) forgetSubmitted(id);
  if (job && job.status === "done" && job.request && job.request.seed != null) state.lastSeed = job.request.seed;
  if (job && state.shownJob === id) showJob(job);
  await refreshJobs(true);
}

function elapsed(job) {
  if (job.started == null || job.finished == null) return "";
  const toSeconds = (t) => (typeof t === "number" ? t : Date.parse(t) / 1000);
  const seconds = toSeconds(job.finished) - toSeconds(job.started);
  return Number.isFinite(seconds) ? ` in ${seconds.toFixed(1)} s` : "";
}

// Show a job in the viewer: its images, its parameters and its status.
function showJob(job) {
  state.shownJob = job.id;
  const status = shownStatus(job);
  const n = job.steps || (job.request && job.request.steps) || 1;
  if (status === "done") setProgress(n, n, `Done${elapsed(job)}`);
  else if (status === "failed") setProgress(0, 1, "Failed");
  else if (status === "cancelled" || status === "interrupted") setProgress(job.step || 0, n, status === "cancelled" ? "Cancelled" : "Interrupted");
  else if (status === "running") setProgress(job.step || 0, n, stepText(job.step || 0, n, batchCount(job.request)));
  else setProgress(job.step || 0, n, "Queued");
  if (status === "failed" && job.error) showError(`Job failed: ${job.error}`);
  const results = $("results");
  results.replaceChildren();
  for (const [index, url] of (job.images || []).entries()) {
    const link = document.createElement("a");
    link.href = url;
    link.target = "_blank";
    const img = document.createElement("img");
    img.src = url;
    img.className = index === chosenIndex(job) && job.images.length > 1 ? "result chosen" : "result";
    img.alt = `Result ${index + 1}: ${job.request ? job.request.prompt : ""}`;
    link.append(img);
    results.append(link);
  }
  if ((job.images || []).length || !ACTIVE.has(status)) $("preview").hidden = true;
  $("infotext").textContent = (job.infotexts || []).join("\n\n");
}

// A batch's picture opened from its thumbnail: shown in the viewer, outlined there, and the one the card's img2img
// sends (A1111's Send to img2img takes the gallery's selected picture); a card never opened sends its first
function choosePicture(job, index) {
  state.chosenPictures[job.id] = index;
  showJob(job);
}

function chosenIndex(job) {
  const index = state.chosenPictures[job.id] ?? 0;
  return index < (job.images || []).length ? index : 0;
}

// A job's status as the page names it: a cancelled job with pictures was interrupted (A1111's Interrupt, or a
// cancel after some of its batches were drawn), its pictures kept
const shownStatus = (job) => (job.status === "cancelled" && (job.images || []).length ? "interrupted" : job.status);

// Interrupt and Skip (A1111's) of this page's running job: Interrupt stops it, the batch being drawn ending with
// its pictures as far as they got; Skip ends that batch so and goes on with the next
async function stopRunning(action) {
  if (!state.runningId) return;
  try {
    await api(`/api/jobs/${encodeURIComponent(state.runningId)}/${action}`, { method: "POST" });
  } catch (err) {
    showError(err.message);
  }
  refreshJobs();
}

function setRunning(id) {
  state.runningId = id;
  $("interrupt").disabled = $("skip").disabled = !id;
}

async function cancelJob(id) {
  try {
    await api(`/api/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
  } catch (err) {
    showError(err.message);
  }
  refreshJobs();
}

// The Cancel button: this page's job being followed (normally its running one), else its newest one waiting;
// never another page's job (the queue list cancels any job by its own button).
function cancelShown() {
  const id = state.follow ? state.follow.id : state.ownActiveIds[state.ownActiveIds.length - 1];
  if (id) cancelJob(id);
}

function makeButton(text, className, onClick, label) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = text;
  button.className = className;
  if (label) { button.setAttribute("aria-label", label); button.title = label; }
  button.addEventListener("click", onClick);
  return button;
}

function badge(status) {
  const span = document.createElement("span");
  span.className = `badge ${status}`;
  span.textContent = status;
  return span;
}

// A queue row's state beside its badge: a running job's steps ("3 / 20"; "starting" until its model is loaded and its
// steps counted), a queued one's place ("next", "2 ahead")
function queueState(job, ahead) {
  if (job.status === "running") return job.steps ? `${job.step || 0} / ${job.steps}` : "starting";
  return ahead === 0 ? "next" : `${ahead} ahead`;
}

function renderQueue(jobs) {
  const queue = $("queue");
  queue.replaceChildren();
  const active = jobs.filter((j) => ACTIVE.has(j.status)).reverse();   // oldest (next to run) first
  if (!active.length) {
    const empty = document.createElement("li");
    empty.className = "empty";
    empty.textContent = "No jobs waiting";
    queue.append(empty);
  }
  let ahead = 0;                           // queued jobs before this one (the server runs them oldest first)
  for (const job of active) {
    const item = document.createElement("li");
    item.dataset.jobId = job.id;
    item.dataset.status = job.status;
    const prompt = document.createElement("span");
    prompt.className = "prompt";
    prompt.textContent = (job.request && job.request.prompt) || "(no prompt)";
    const progress = document.createElement("span");
    progress.textContent = queueState(job, job.status === "running" ? 0 : ahead++);
    item.append(badge(job.status), prompt, progress,
      makeButton("Cancel", "cancel-job", () => cancelJob(job.id), `Cancel job ${job.id}`));
    queue.append(item);
  }
}

async function imageToInit(url) {
  try {
    const response = await fetch(url, { credentials: "same-origin" });
    if (!response.ok) throw new ApiError(`${response.status}: cannot load ${url}`);
    await setInitImage(await readFile(await response.blob()));
    if (state.mode === "txt2img") setMode("img2img");
    showFormAt($("image-section"), $("init-image"));
  } catch (err) {
    showError(err.message);
  }
}

function reuseSettings(job) {
  showError("");
  // its mode tells the notice what applies; the tab stays. A job records its batch count only above 1
  const settings = { batch_count: 1, styles: [], ...(job.request || {}) };   // nor its styles when it has none
  if (job.request && job.request.model === undefined && job.model) settings.model = job.model;
  const missing = applySettings(settings);
  if (job.request && job.request.seed != null) state.lastSeed = job.request.seed;
  showNotice(filledNotice("Settings reused", missing, { quiet: true }));
  if (!missingModelLists().length) showFormAt($("settings"), $("prompt"));   // else its list has the focus, in view
}

function renderGallery(jobs) {
  const gallery = $("gallery");
  gallery.replaceChildren();
  if (!galleryJobs(jobs).some((j) => !ACTIVE.has(j.status))) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "Finished jobs appear here";
    gallery.append(empty);
  }
  for (const job of galleryJobs(jobs).filter((j) => !ACTIVE.has(j.status))) {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.jobId = job.id;
    card.dataset.status = job.status;
    const thumbs = document.createElement("div");
    thumbs.className = "thumbs";
    for (const [index, url] of (job.images || []).entries()) {
      const img = document.createElement("img");
      img.src = url;
      img.alt = (job.request && job.request.prompt) || "result";
      img.loading = "lazy";
      // a button, so that the keyboard opens the job in the viewer as a click does
      const open = makeButton("", "thumb", () => choosePicture(job, index),
        `Show job ${job.id} (picture ${index + 1}) in the viewer`);
      open.append(img);
      thumbs.append(open);
    }
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.textContent = (job.request && job.request.prompt) || "(no prompt)";
    caption.title = caption.textContent;
    const meta = document.createElement("div");
    meta.className = "meta";
    const seed = document.createElement("span");
    if (job.request && job.request.seed != null) seed.textContent = `seed ${job.request.seed}`;
    const error = document.createElement("div");
    error.className = "card-error";
    error.textContent = job.error || "";
    error.hidden = !job.error;
    meta.append(badge(shownStatus(job)), seed);
    const buttons = document.createElement("div");
    buttons.className = "row";
    buttons.append(makeButton("Reuse", "reuse", () => reuseSettings(job), `Reuse the settings of job ${job.id}`));
    if ((job.images || []).length) {
      buttons.append(makeButton("img2img", "to-img2img", () => imageToInit(job.images[chosenIndex(job)]),
        `Use the image of job ${job.id} for img2img (the picture last opened from its thumbnails)`));
      buttons.append(makeButton("Download", "download", () => downloadPictures(job), `Download the pictures of job ${job.id}`));
    }
    buttons.append(makeButton("Delete", "delete-job", () => deleteJob(job), `Delete job ${job.id} and its pictures`));
    card.append(thumbs, caption, error, meta, buttons);
    gallery.append(card);
  }
  if (state.moreJobs) {
    gallery.append(makeButton("Load more", "load-more", loadOlderJobs, "Show older jobs of the history"));
  }
}

// The finished jobs the gallery shows: the polled page's, then the older ones read with Load more (newest first)
function galleryJobs(jobs) {
  const listed = new Set(jobs.map((j) => j.id));
  return [...jobs, ...state.olderJobs.filter((j) => !listed.has(j.id))];
}

// Load more: the page of the history after the oldest job the gallery lists (GET /api/jobs?before=ID). One
// deleted meanwhile (another tab, the API: a 404) leaves the gallery, and the page is read after the next oldest.
async function loadOlderJobs() {
  let shown = galleryJobs(state.jobs);
  try {
    while (shown.length) {
      const oldest = shown[shown.length - 1].id;
      let data;
      try {
        data = await api(`/api/jobs?limit=${JOBS_PAGE}&before=${encodeURIComponent(oldest)}`);
      } catch (err) {
        if (err.status !== 404) throw err;
        state.olderJobs = state.olderJobs.filter((j) => j.id !== oldest);
        state.jobs = state.jobs.filter((j) => j.id !== oldest);
        shown = galleryJobs(state.jobs);
        continue;
      }
      const page = (data && data.jobs) || [];
      state.olderJobs.push(...page);
      state.moreJobs = page.length >= JOBS_PAGE;
      break;
    }
  } catch (err) {
    showError(`Cannot load older jobs: ${err.message}`);
    return;
  }
  renderGallery(state.jobs);
}

// A picture's file name as the browser saves it: its seed and the first words of its prompt (A1111's
// "[seed]-[prompt_spaces]" pattern), e.g. "1234-a lighthouse at dusk.png"
function pictureFileName(job, index) {
  const seed = ((job.infotexts || [])[index] || "").match(/(?:^|, )Seed: (-?\d+)/);
  const prompt = ((job.request && job.request.prompt) || "").replace(/[\\/:*?"<>|\x00-\x1f]+/g, " ")
    .replace(/\s+/g, " ").trim().slice(0, 60).trim();
  const number = seed ? seed[1] : `${job.id.slice(0, 8)}-${index + 1}`;
  return `${number}${prompt ? `-${prompt}` : ""}.png`;
}

// Download: each picture of the job as the server wrote it (a PNG with its parameters text), one file each
function downloadPictures(job) {
  for (const [index, url] of (job.images || []).entries()) {
    const link = document.createElement("a");
    link.href = url;
    link.download = pictureFileName(job, index);
    document.body.append(link);
    link.click();
    link.remove();
  }
}

// Delete, after the user confirms: the job and its pictures leave the server's history (POST /api/jobs/ID/delete)
async function deleteJob(job) {
  const count = (job.images || []).length;
  const what = count ? `and its ${count === 1 ? "picture" : `${count} pictures`} ` : "";
  if (!window.confirm(`Delete this job ${what}from the server? This cannot be undone.`)) return;
  try {
    await api(`/api/jobs/${encodeURIComponent(job.id)}/delete`, { method: "POST" });
  } catch (err) {
    showError(`Cannot delete the job: ${err.message}`);
    return;
  }
  state.olderJobs = state.olderJobs.filter((j) => j.id !== job.id);
  state.jobs = state.jobs.filter((j) => j.id !== job.id);
  if (state.shownJob === job.id) {              // the viewer showed it: nothing of it is left to show
    state.shownJob = null;
    $("results").replaceChildren();
    $("infotext").textContent = "";
    setProgress(0, 1, "Idle");
  }
  renderGallery(state.jobs);
  refreshJobs(true);
}

// The history past the polled page `jobs`, as far as the gallery's older jobs reach (Load more's pages, and the
// jobs new ones pushed off the polled page), read again at each poll so that a job deleted elsewhere leaves them;
// null where nothing older is shown or the read failed (the older jobs then stay as they are until the next poll)
async function readPastPage(jobs) {
  if (!state.olderJobs.length) return null;
  if (!jobs.length) return [];                   // the history is empty
  let wanted = state.olderJobs.length + state.jobs.length;
  const past = [];
  try {
    while (wanted > 0) {
      const limit = Math.min(wanted, 1000);      // GET /api/jobs's largest page
      const oldest = past.length ? past[past.length - 1] : jobs[jobs.length - 1];
      const data = await api(`/api/jobs?limit=${limit}&before=${encodeURIComponent(oldest.id)}`);
      const page = (data && data.jobs) || [];
      past.push(...page);
      wanted -= limit;
      if (page.length < limit) break;
    }
  } catch (_) {                                  // e.g. a 404: the polled page's last job deleted meanwhile
    return null;
  }
  return past;
}

// Poll the job list: queue view, gallery, which of this page's jobs to follow, and its jobs that ended
// unseen (cancelled while queued, or while no stream followed them). Other pages' jobs show in the queue
// list only: they never take over this page's viewer, progress bar or Cancel button.
async function refreshJobs(force = false) {
  const queuedBefore = [...state.submitted];     // in the history by now (a job is stored when queued)
  let data;
  try {
    data = await api(`/api/jobs?limit=${JOBS_PAGE}`);
  } catch (err) {
    // no server answers (stopped, the network gone): say so once, or the page would show its job's last step for
    // good; the first poll that is answered takes the error away (below)
    if (err.status === null && !$("error").textContent.includes(UNREACHABLE)) showError(err.message);
    return;
  }
  if (state.unreachable) {                   // the server answers again: its "cannot reach" error is over
    state.unreachable = false;
    if ($("error").textContent.includes(UNREACHABLE)) showError("");
  }
  const jobs = (data && data.jobs) || [];
  const checked = new Set(state.olderJobs.map((j) => j.id));
  const past = await readPastPage(jobs);
  const active = jobs.filter((j) => ACTIVE.has(j.status)).reverse();     // oldest (next to run) first
  const own = active.filter((j) => state.submitted.has(j.id));
  state.activeIds = active.map((j) => j.id);
  state.ownActiveIds = own.map((j) => j.id);
  $("cancel").disabled = own.length === 0;
  setRunning(own.find((j) => j.status === "running")?.id ?? null);
  const next = own.find((j) => j.status === "running") || own[0];
  if (next) followJob(next.id);
  else stopFollowing();
  const listed = new Set(jobs.map((j) => j.id));
  for (const id of queuedBefore) if (!listed.has(id)) forgetSubmitted(id);     // gone from the history
  let seedTaken = false;                         // from the newest of them (jobs come newest first)
  for (const job of jobs) {
    if (state.submitted.has(job.id) && !ACTIVE.has(job.status) && (!state.follow || state.follow.id !== job.id)) {
      forgetSubmitted(job.id);
      if (!seedTaken && job.status === "done" && job.request && job.request.seed != null) {
        state.lastSeed = job.request.seed;
        seedTaken = true;
      }
      // the job on screen, or the newest (jobs come newest first) on a page that shows none yet: one that ended
      // while the page was away (reloaded while it ran)
      if (state.shownJob === job.id || state.shownJob == null) showJob(job);
    }
  }
  if (state.olderJobs.length) {          // older pages shown: a job new ones pushed off the polled page stays;
    // pushed off are those past the last job the page still lists (one missing before it was deleted elsewhere)
    const kept = state.jobs.map((j) => listed.has(j.id)).lastIndexOf(true);
    const pushedOff = state.jobs.filter((j, i) => i > kept && !listed.has(j.id) && !ACTIVE.has(j.status));
    state.olderJobs.unshift(...pushedOff);
    if (past) {                          // one deleted elsewhere (another tab, the API) leaves Load more's pages
      const still = new Set(past.map((j) => j.id));
      const before = state.olderJobs.length;
      state.olderJobs = state.olderJobs.filter((j) => !checked.has(j.id) || still.has(j.id));
      force = force || state.olderJobs.length !== before;
    }
  } else {
    state.moreJobs = jobs.length >= JOBS_PAGE;
  }
  state.jobs = jobs;
  const signature = JSON.stringify(jobs.map((j) => [j.id, j.status, j.step, j.steps, (j.images || []).length]));
  if (signature === state.jobsSignature && !force) return;
  state.jobsSignature = signature;
  renderQueue(jobs);
  renderGallery(jobs);
}

// ---------------------------------------------------------------- PNG parameters

// A dropped or chosen picture's parameters, read by the server as `sdlab txt2img --from-png` reads them
// (`POST /api/parameters`), fill the form; what it has no control for is kept (`KEPT`) or named in the notice
async function readParameters(file) {
  showError("");
  showNotice("");
  const name = file.name || "the image";
  try {
    const dataUrl = await readFile(file);
    const read = await api("/api/parameters", { method: "POST", body: { image: base64Of(dataUrl) } });
    const unread = read.unread.map((text) => (text.length > 60 ? text.slice(0, 59) + "\u2026" : text));
    const missing = applySettings({ ...read.settings, unread, control_units: read.control_units });
    showNotice(filledNotice(`Settings read from ${name}`, missing));
  } catch (err) {
    showError(`Cannot read the parameters of ${name}: ${err.message}`);
  }
}

function setupDrop() {
  const overlay = $("drop-overlay");
  const zone = $("init-drop");
  let depth = 0;
  const hasFiles = (event) => [...(event.dataTransfer?.types || [])].includes("Files");
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth += 1;
    if (!zone.contains(event.target)) overlay.hidden = false;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) overlay.hidden = true;
  });
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    const onZone = zone.contains(event.target) && state.mode !== "txt2img";
    overlay.hidden = onZone || Boolean(event.target.closest?.("[data-picture]"));
    zone.classList.toggle("dragging", onZone);
  });
  document.addEventListener("drop", async (event) => {
    const file = event.dataTransfer?.files?.[0];
    depth = 0;
    overlay.hidden = true;
    zone.classList.remove("dragging");
    if (!file) return;
    event.preventDefault();
    const pictureZone = event.target.closest?.("[data-picture]");    // a ControlNet unit's or the IP-Adapter's
    if (pictureZone) {
      try { await setControlPicture(pictureZone.dataset.picture, await readFile(file)); } catch (err) { showError(err.message); }
    } else if (zone.contains(event.target) && state.mode !== "txt2img") {
      try { await setInitImage(await readFile(file)); } catch (err) { showError(err.message); }
    } else {
      await readParameters(file);
    }
  });
}

// ---------------------------------------------------------------- wiring

function setup() {
  buildOptionBoxes();
  setupControls();                          // controlnet.js (before setMode, which shows the units' state)
  setMode("txt2img");
  setupMaskPainting();
  setupDrop();
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const tab of tabs) tab.addEventListener("click", () => setMode(tab.dataset.mode));
  $("settings").querySelector('[role="tablist"]').addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (!step) return;
    const next = tabs[(tabs.findIndex((t) => t.dataset.mode === state.mode) + step + tabs.length) % tabs.length];
    setMode(next.dataset.mode);
    next.focus();
    event.preventDefault();
  });
  $("settings").addEventListener("submit", (event) => { event.preventDefault(); generate(); });
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Enter") return;
    if (event.ctrlKey || event.metaKey) {
      event.preventDefault();
      if (!event.repeat) generate();
    } else if (event.target.tagName === "INPUT" && event.target.type !== "file") {
      event.preventDefault();               // Enter in a number field does not queue a job; Ctrl+Enter does
    }
  });
  $("cancel").addEventListener("click", cancelShown);
  $("interrupt").addEventListener("click", () => stopRunning("interrupt"));
  $("skip").addEventListener("click", () => stopRunning("skip"));
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; });
  $("seed-reuse").addEventListener("click", () => {
    if (state.lastSeed == null) showNotice("No finished job yet to take a seed from");
    else $("seed").value = state.lastSeed;
  });
  $("lora-add").addEventListener("click", addChosenLora);
  $("style-choice").addEventListener("change", addChosenStyle);
  // the server reads an edited styles.csv again: coming back to the page (from the editor) lists it as it now is
  window.addEventListener("focus", () => {
    loadStyles().catch((err) => showError(`Could not load the styles: ${err.message}`));
    loadScripts().catch((err) => showError(`Could not load the scripts: ${err.message}`));
  });
  setupAxisChoices();
  $("script").addEventListener("change", showScriptControls);
  for (const id of ["strength", "image_cfg_scale", "subseed_strength", "hr_denoise"]) {
    $(id).addEventListener("input", () => showSliderValue(id));
  }
  $("image_cfg_none").addEventListener("change", () => setImageGuidance(!$("image_cfg_none").checked));
  for (const id of Object.keys(TOGGLES)) $(id).addEventListener("change", () => setToggle(id, $(id).checked));
  for (const id of new Set(Object.values(KEPT).flatMap((k) => k.with))) $(id).addEventListener("change", () => dropKept(id));
  $("subseed-random").addEventListener("click", () => { $("subseed").value = -1; });
  $("brush-size").addEventListener("input", () => { $("brush-size-value").textContent = $("brush-size").value; });
  $("mask-clear").addEventListener("click", clearMask);
  $("mask-file").addEventListener("change", async () => {
    const file = $("mask-file").files[0];
    showError("");
    try { if (file) await loadMask(await readFile(file)); } catch (err) { showError(err.message); }
    $("mask-file").value = "";
  });
  $("init-image").addEventListener("change", async () => {
    const file = $("init-image").files[0];
    if (!file) return;
    try { await setInitImage(await readFile(file)); } catch (err) { showError(err.message); }
  });
  $("png-info-file").addEventListener("change", async () => {
    const file = $("png-info-file").files[0];
    if (file) await readParameters(file);
    $("png-info-file").value = "";
  });
  for (const id of Object.keys(MODEL_LISTS)) $(id).addEventListener("change", () => markMissingModel(id, null));
  $("model-refresh").addEventListener("click", async () => {
    try {
      await Promise.all(["refresh-checkpoints", "refresh-vae"].map((route) => api(`/sdapi/v1/${route}`, { method: "POST" })));
      await Promise.all([loadModels(), loadLoras(), loadVaes(), loadScripts()]);    // the axes' checkpoints, VAEs
    } catch (err) {
      showError(err.message);
    }
  });
  renderLoras();
  loadLists().then(refreshJobs);
  setInterval(() => { if (state.activeIds.length || state.submitted.size) refreshJobs(); }, 1500);
  setInterval(refreshJobs, 10000);
}

document.addEventListener("DOMContentLoaded", setup);
