// sdlab web UI: the ControlNet units and the IP-Adapter box (loaded after app.js, whose helpers it uses).
//   lists:    GET /api/control-models (the ControlNet folder's models by the job field that takes them: a unit's
//             ControlNets and T2I-Adapters, the IP-Adapter box's IP-Adapters; rescanned),
//             GET /controlnet/module_list (the preprocessors and each one's threshold sliders),
//             GET /controlnet/control_types (the Control Type filter; its IP-Adapter type's modules, the IP-Adapter
//             box's image encoders)
//   preview:  POST /controlnet/detect (a unit's picture through its preprocessor)
//   a job:    the native API's `controls: [{model, image, strength, start, end, module, control_mode, resize_mode,
//             threshold_a, threshold_b, processor_res, pixel_perfect}]` and `ip_adapters: [{model, image, scale,
//             start, end, layer_scales, module, resize_mode}]`
"use strict";

const CONTROL_UNIT_COUNT = 3;      // the extension's default unit count (GET /controlnet/settings)
// the preprocessors the extension runs at its Processor Res (pipeline/preprocess.py RESOLUTION_MODULES)
const RESOLUTION_MODULES = ["canny", "threshold", "scribble"];
const CONTROL_MODES = [["balanced", "Balanced"], ["prompt", "My prompt is more important"],
  ["control", "ControlNet is more important"]];
const CONTROL_RESIZE_MODES = [["resize", "Just Resize"], ["crop", "Crop and Resize"], ["fill", "Resize and Fill"]];
// A new unit's values, as the extension's (its Processor Res 512, Crop and Resize): the boxes start with them, and
// settings without one of them fill it (the preprocessor's own thresholds: showModuleSliders; settings' null
// thresholds and Processor res, the preprocessor's defaults, leave their boxes empty: fillControls)
const UNIT_DEFAULTS = { weight: 1, start: 0, end: 1, control_mode: "balanced", resize_mode: "crop", processor_res: 512 };

const controlState = {
  pictures: Array(CONTROL_UNIT_COUNT).fill(null),   // each unit's own control picture (data URL), or none
  ipPicture: null,                                   // the IP-Adapter's picture (data URL), or none
  ipFace: null,                                      // its FaceID face embedding {name, data: .npy base64}, or none
  sliders: {},                                       // module -> its threshold sliders [{name, min, max, value, step}]
  unitModels: [],                                    // the titles a unit may draw with (ControlNets, T2I-Adapters)
  unitModules: [],                                   // the preprocessors a unit may run [{name, label}] (label: the
                                                     // extension's UI name, as control types list them)
  types: {},                                         // Control Type -> {module_list, model_list, default_option, ...}
  chosenTypes: Array(CONTROL_UNIT_COUNT).fill("All"),  // each unit's Control Type
};
// The extension's IP-Adapter modules (ip_adapter_units.LISTED_MODULES): the IP-Adapter box's, not a unit's
const isIpAdapterModule = (name) => /^ip-adapter[-_]/.test(name);
// An IP-Adapter FaceID (or FaceID Plus) model, by its name as the extension tells one ("faceid" in it)
const isFaceIdModel = (title) => /faceid/i.test(title);

function element(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function labelled(id, text, control, title = "") {
  return element("div", {}, [element("label", { htmlFor: id, textContent: text, title }), control]);
}

function numberInput(id, value, min, max, step) {
  return element("input", { type: "number", id, value, min, max, step });
}

function choiceSelect(id, choices, chosen) {
  const select = element("select", { id });
  for (const [value, label] of choices) select.append(new Option(label, value, false, value === chosen));
  return select;
}

// A picture box of `name` (a unit, the IP-Adapter): a file picker (its input visually hidden, not hidden, so the
// keyboard reaches it), a drop zone showing the picture (`data-picture` routes a drop here: setupDrop), a Clear
// button; the picker and Clear are named with the box's owner
function pictureBox(prefix, name, placeholder) {
  return [
    element("div", { className: "row" }, [
      element("label", { className: "file-button", htmlFor: `${prefix}_file`, textContent: "Choose picture" }, [
        element("input", { type: "file", id: `${prefix}_file`, accept: "image/*", className: "visually-hidden",
          "aria-label": `${name}: choose a picture` })]),
      element("button", { type: "button", id: `${prefix}_clear`, textContent: "Clear",
        "aria-label": `Clear the picture of ${name}` }),
    ]),
    element("div", { id: `${prefix}_drop`, className: "drop-zone picture-drop", dataset: { picture: prefix },
      role: "group", "aria-label": `${placeholder} (drop a picture here)` }, [
      element("p", { id: `${prefix}_placeholder`, textContent: placeholder }),
      element("img", { id: `${prefix}_view`, className: "control-picture", alt: `The picture of ${name}`,
        hidden: true }),
    ]),
  ];
}

// One ControlNet unit, as the extension's: Enable, its picture, Preprocessor, Model, Control weight, Starting /
// Ending control step, Control mode, Resize mode, Pixel perfect, Processor res and thresholds (as its preprocessor
// has them), and Preview of the preprocessed map
function controlUnit(i) {
  const p = `cn${i}`;
  const sliderBox = (key) => element("div", { id: `${p}_${key}_box`, hidden: true }, [
    element("label", { htmlFor: `${p}_${key}`, id: `${p}_${key}_label` }), numberInput(`${p}_${key}`, "", 0, 255, 1)]);
  return element("details", { id: p, className: "control-unit", open: i === 0 }, [
    element("summary", { id: `${p}_summary`, textContent: `ControlNet Unit ${i}` }),
    element("label", { className: "toggle" }, [
      element("input", { type: "checkbox", id: `${p}_enabled`, "aria-label": `Enable ControlNet Unit ${i}` }), " Enable"]),
    ...pictureBox(p, `ControlNet Unit ${i}`, "Control picture (none: img2img's initial image)"),
    element("fieldset", { id: `${p}_types`, className: "control-types" }, [
      element("legend", { textContent: "Control Type",
        title: "Narrows Preprocessor and Model to one kind of control and picks its defaults (the extension's)" })]),
    element("div", { className: "grid2" }, [
      labelled(`${p}_module`, "Preprocessor", element("select", { id: `${p}_module` })),
      labelled(`${p}_model`, "Model", element("select", { id: `${p}_model` }),
        "A ControlNet or T2I-Adapter of the server's ControlNet folder"),
      labelled(`${p}_weight`, "Control weight", numberInput(`${p}_weight`, UNIT_DEFAULTS.weight, 0, 2, 0.05)),
      labelled(`${p}_control_mode`, "Control mode", choiceSelect(`${p}_control_mode`, CONTROL_MODES, UNIT_DEFAULTS.control_mode)),
      labelled(`${p}_start`, "Starting control step", numberInput(`${p}_start`, UNIT_DEFAULTS.start, 0, 1, 0.01)),
      labelled(`${p}_end`, "Ending control step", numberInput(`${p}_end`, UNIT_DEFAULTS.end, 0, 1, 0.01)),
      labelled(`${p}_resize_mode`, "Resize mode",
        choiceSelect(`${p}_resize_mode`, CONTROL_RESIZE_MODES, UNIT_DEFAULTS.resize_mode),
        "How the control picture fits the picture drawn"),
      element("div", { id: `${p}_res_box`, hidden: true }, [
        element("label", { htmlFor: `${p}_processor_res`, textContent: "Processor res" }),
        element("div", { className: "row" }, [Object.assign(numberInput(`${p}_processor_res`,
          UNIT_DEFAULTS.processor_res, 64, 2048, 1), { placeholder: "default" }),     // empty: the preprocessor's
          element("label", { className: "toggle", title: "The resolution from the picture's size (A1111's Pixel Perfect)" },
            [element("input", { type: "checkbox", id: `${p}_pixel_perfect` }), " Pixel perfect"])]),
      ]),
      sliderBox("threshold_a"),
      sliderBox("threshold_b"),
    ]),
    element("div", { className: "row control-preview-row" }, [
      element("button", { type: "button", id: `${p}_preview_button`, textContent: "Preview",
        title: "The preprocessor's map of the control picture (POST /controlnet/detect)" }),
      element("img", { id: `${p}_preview`, className: "control-picture", alt: `Unit ${i} preprocessed map`, hidden: true }),
    ]),
  ]);
}

// Show a unit's Processor res and thresholds as its preprocessor has them, each threshold at its slider's default
function showModuleSliders(i) {
  const p = `cn${i}`;
  const module = $(`${p}_module`).value;
  $(`${p}_res_box`).hidden = !RESOLUTION_MODULES.includes(module);
  const sliders = controlState.sliders[module] || [];
  ["threshold_a", "threshold_b"].forEach((key, index) => {
    const slider = sliders[index];
    $(`${p}_${key}_box`).hidden = !slider;
    if (!slider) return;
    $(`${p}_${key}_label`).textContent = slider.name;
    Object.assign($(`${p}_${key}`), { min: slider.min, max: slider.max, step: slider.step ?? 1, value: slider.value,
      placeholder: `default: ${slider.value}` });                  // emptied: the preprocessor's default
  });
}

// Unit i's state shown: its title names its preprocessor while it is enabled (folded, as the extension's tab shows
// an active unit), and the boxes the job would not read are greyed out, as the extension's: Processor res under
// Pixel perfect, and Resize mode where the unit takes img2img's / inpaint's initial image (with img2img's)
function showUnitState(i) {
  const p = `cn${i}`;
  const on = $(`${p}_enabled`).checked;
  $(`${p}_summary`).textContent = `ControlNet Unit ${i}` + (on ? ` (enabled: ${$(`${p}_module`).value || "none"})` : "");
  $(`${p}_summary`).classList.toggle("unit-on", on);
  $(`${p}_processor_res`).disabled = $(`${p}_pixel_perfect`).checked;
  const onInitial = state.mode !== "txt2img" && !controlState.pictures[i];
  $(`${p}_resize_mode`).disabled = onInitial;
  $(`${p}_resize_mode`).title = onInitial ? "The unit takes the initial image with img2img's Resize mode" : "";
}

function showUnitStates() {
  for (let i = 0; i < CONTROL_UNIT_COUNT; i++) showUnitState(i);
}

function showPicture(prefix, dataUrl) {
  $(`${prefix}_view`).src = dataUrl || "";
  $(`${prefix}_view`).hidden = !dataUrl;
  $(`${prefix}_placeholder`).hidden = Boolean(dataUrl);
}

// Set the picture of a box (`prefix`: cnN or ipa) from a data URL (null clears it); a picture given to a unit ticks
// its Enable, as the extension's upload does (javascript/active_units.js), Clear leaves it
async function setControlPicture(prefix, dataUrl) {
  showError("");                                    // a picture given again ends the error of the last one
  if (dataUrl) await loadImage(dataUrl);            // a file the browser cannot read is refused here
  if (prefix === "ipa") controlState.ipPicture = dataUrl;
  else controlState.pictures[Number(prefix.slice(2))] = dataUrl;
  showPicture(prefix, dataUrl);
  if (prefix === "ipa") return;
  $(`${prefix}_preview`).hidden = true;
  if (dataUrl) $(`${prefix}_enabled`).checked = true;
  showUnitState(Number(prefix.slice(2)));
}

// The ControlNet folder's models (a unit's ControlNets, the IP-Adapter box's IP-Adapters), the preprocessors and
// the control types, into every unit's selects (a choice still listed stays) and Control Type radios
async function loadControlLists() {
  const [models, modules, labels, types] = await Promise.all([api("/api/control-models"),
    api("/controlnet/module_list"), api("/controlnet/module_list?alias_names=true"), controlTypesOfTheModel()]);
  const names = (modules && modules.module_list) || [];
  controlState.sliders = Object.fromEntries(Object.entries((modules && modules.module_detail) || {})
    .map(([name, detail]) => [name, (detail.sliders || []).slice(1).filter(Boolean)]));
  controlState.unitModels = (models && models.controls) || [];
  const listed = names.map((name, index) => ({ name, label: labels?.module_list?.[index] ?? name }));
  controlState.unitModules = listed.filter(({ name }) => !isIpAdapterModule(name));
  controlState.types = types.units;
  for (let i = 0; i < CONTROL_UNIT_COUNT; i++) {
    showControlTypes(i);
    fillUnitLists(i);
  }
  const adapters = (models && models.ip_adapters) || [];
  fillSelect($("ipa_model"), adapters.map((title) => ({ label: title, value: title })),
    { blank: adapters.length ? "None" : "no IP-Adapters found" });
  fillSelect($("ipa_module"), typeModules(types.ipAdapter, listed).filter(({ name }) => name !== "none")
    .map(({ name, label }) => ({ label, value: name })), { blank: "The adapter's own" });
}

// The preprocessors a control type lists, in its order, as {name, label} of `listed` (the extension lists a type's
// by its labels; sdlab's names are taken too)
function typeModules(type, listed) {
  return ((type && type.module_list) || [])
    .map((shown) => listed.find(({ name, label }) => shown === label || shown === name))
    .filter(Boolean);
}

// The control types for the model the form draws with (none chosen: the server's selected model), their Model
// lists narrowed to its family as the extension's radio narrows them to the loaded model's
// (GET /controlnet/control_types?model=): {units: the units' Control Types, ipAdapter: the IP-Adapter type,
// whose modules are the IP-Adapter box's Image encoders}
async function controlTypesOfTheModel() {
  const types = await api(`/controlnet/control_types?model=${encodeURIComponent($("model").value)}`);
  const { "IP-Adapter": ipAdapter, ...units } = (types && types.control_types) || {};
  return { units, ipAdapter };
}

// The control types read again for the model chosen now (the extension reads the loaded model's version each
// time a type is chosen), each unit's lists narrowed by them; `then`: what runs after, with them in place
async function refreshControlTypes(then = () => {}) {
  try {
    controlState.types = (await controlTypesOfTheModel()).units;
  } catch (err) {
    showError(err.message);
  }
  then();
}

// Unit i's Control Type radios, as the server lists the types (the one chosen stays while it is listed)
function showControlTypes(i) {
  const p = `cn${i}`;
  if (!(controlState.chosenTypes[i] in controlState.types)) controlState.chosenTypes[i] = "All";
  const radios = Object.keys(controlState.types).map((name, index) => element("label", { className: "toggle" }, [
    element("input", { type: "radio", name: `${p}_type`, id: `${p}_type_${index}`, value: name,
      checked: name === controlState.chosenTypes[i] }), ` ${name}`]));
  $(`${p}_types`).replaceChildren($(`${p}_types`).querySelector("legend"), ...radios);
  $(`${p}_types`).hidden = !radios.length;
}

// Unit i's Preprocessor and Model lists as its Control Type narrows them (the extension's select_control_type,
// served at /controlnet/control_types; "All": every one): the type's preprocessors in its order, shown by the
// extension's names (a unit's value stays sdlab's name); `pick`: a type just chosen, whose default
// preprocessor and model are selected, as the extension's radio does. A choice still listed stays otherwise.
function fillUnitLists(i, pick = false) {
  const p = `cn${i}`;
  const type = controlState.types[controlState.chosenTypes[i]];
  const modules = !type ? controlState.unitModules : typeModules(type, controlState.unitModules);
  const models = controlState.unitModels.filter((title) => !type || type.model_list.includes(title));
  const module = $(`${p}_module`).value;
  fillSelect($(`${p}_model`), models.map((title) => ({ label: title, value: title })),
    { blank: controlState.unitModels.length ? "None" : "no ControlNets found" });
  fillSelect($(`${p}_module`), modules.map(({ name, label }) => ({ label, value: name })));
  if (pick && type) {
    const chosen = modules.find(({ name, label }) => type.default_option === name || type.default_option === label);
    $(`${p}_module`).value = (chosen || modules[0] || { name: "" }).name;
    $(`${p}_model`).value = models.includes(type.default_model) ? type.default_model : "";
  }
  if (pick || module !== $(`${p}_module`).value || !module) showModuleSliders(i);
  showUnitState(i);
}

// Unit i's Control Type set to `name`, its lists narrowed (`fillUnitLists`; `pick`: its defaults selected)
function chooseControlType(i, name, pick) {
  controlState.chosenTypes[i] = name in controlState.types ? name : "All";
  const radio = [...document.getElementsByName(`cn${i}_type`)].find((r) => r.value === controlState.chosenTypes[i]);
  if (radio) radio.checked = true;
  fillUnitLists(i, pick);
}

// A unit's (or the IP-Adapter's) number box as the form reads its own (`numberField`): empty is left out (the
// server's default), text that is not a number is the page's error naming the unit
function controlNumber(id, what, options = {}) {
  try {
    return numberField(id, options);
  } catch (err) {
    throw new ApiError(`${what}: ${err.message}`);
  }
}

// The picture a unit or the IP-Adapter draws with: its own, else img2img's / inpaint's initial image (as the
// extension takes it), with whether it is the initial image
function pictureOf(own, what) {
  if (own) return { picture: own, initial: false };
  if (state.mode !== "txt2img" && state.initImage) return { picture: state.initImage, initial: true };
  throw new ApiError(`${what} needs a picture: choose or drop one`);
}

// Unit i's preprocessor and the numbers it reads: thresholds as its sliders have them, Processor res for the
// RESOLUTION_MODULES without Pixel perfect (null: one it has not, or Pixel perfect's from the sizes)
function preprocessorFields(i, what) {
  const p = `cn${i}`;
  const module = $(`${p}_module`).value || "none";
  const thresholds = controlState.sliders[module] || [];
  const resolution = RESOLUTION_MODULES.includes(module) && !$(`${p}_pixel_perfect`).checked;
  return {
    module,
    threshold_a: thresholds.length > 0 ? controlNumber(`${p}_threshold_a`, what) : null,
    threshold_b: thresholds.length > 1 ? controlNumber(`${p}_threshold_b`, what) : null,
    processor_res: resolution ? controlNumber(`${p}_processor_res`, what, { integer: true }) : null,
  };
}

// The resize mode unit i runs with: its own, or on the initial image img2img's (the extension's rule; A1111's
// latent upscale is Just Resize for a unit)
function unitResizeMode(i, initial) {
  if (!initial) return $(`cn${i}_resize_mode`).value;
  return $("resize_mode").value === "latent" ? "resize" : $("resize_mode").value;
}

// The extension's Pixel Perfect resolution (preprocess.pixel_perfect_resolution) of a picture of `pictureWidth` x
// `pictureHeight` drawn at width x height: its short side times the scale that fits it inside the drawing under
// "fill", else the scale that covers it, rounded half to even as NumPy rounds
function pixelPerfectResolution(pictureWidth, pictureHeight, width, height, resizeMode) {
  const [k0, k1] = [height / pictureHeight, width / pictureWidth];
  const exact = (resizeMode === "fill" ? Math.min(k0, k1) : Math.max(k0, k1)) * Math.min(pictureWidth, pictureHeight);
  const floor = Math.floor(exact);
  return exact - floor > 0.5 || (exact - floor === 0.5 && floor % 2 === 1) ? floor + 1 : floor;
}

// The size the job draws at: Width and Height, an unset side img2img's / inpaint's initial image's (the native
// API's rule), else the chosen model's default side, as the boxes' "model default" (GET /api/model-size)
async function effectiveSize() {
  const initial = state.mode !== "txt2img" && state.initImage ? $("init-canvas") : null;
  let width = sideField("width") ?? initial?.width;
  let height = sideField("height") ?? initial?.height;
  if (!width || !height) {
    const side = await api(`/api/model-size?model=${encodeURIComponent($("model").value)}`);
    [width, height] = [width || side.width, height || side.height];
  }
  return { width, height };
}

// The enabled units and IP-Adapter as the native API's `controls` and `ip_adapters` (none: left out); a unit or
// the IP-Adapter without a picture of its own in img2img / inpaint sends none (each request's initial image, a
// script's too; a unit's Resize mode, greyed out, is sent to be recorded as the extension records its unit's);
// one without a model, or without a picture in txt2img, is an error the page shows
function controlRequest() {
  const body = {};
  const controls = [];
  for (let i = 0; i < CONTROL_UNIT_COUNT; i++) {
    const p = `cn${i}`;
    if (!$(`${p}_enabled`).checked) continue;
    const what = `ControlNet Unit ${i}`;
    if (!$(`${p}_model`).value) throw new ApiError(`${what} needs a model: choose one or untick Enable`);
    const { picture, initial } = pictureOf(controlState.pictures[i], what);
    const preprocessing = preprocessorFields(i, what);
    controls.push({      // no picture of its own: none sent, the server takes each request's initial image
      model: $(`${p}_model`).value, ...(initial ? {} : { image: base64Of(picture) }), ...preprocessing,
      strength: controlNumber(`${p}_weight`, what), start: controlNumber(`${p}_start`, what),
      end: controlNumber(`${p}_end`, what),
      control_mode: $(`${p}_control_mode`).value,
      resize_mode: $(`${p}_resize_mode`).value,      // on the initial image recorded only, as the extension's
      pixel_perfect: RESOLUTION_MODULES.includes(preprocessing.module) && $(`${p}_pixel_perfect`).checked,
    });
  }
  if (controls.length) body.controls = controls;
  if ($("ipa_enabled").checked) {
    if (!$("ipa_model").value) throw new ApiError("IP-Adapter needs a model: choose one or untick it");
    const face = controlState.ipFace;     // with one and no picture of its own: none sent (FaceID reads none;
    if (!face && isFaceIdModel($("ipa_model").value)) {
      throw new ApiError("IP-Adapter FaceID needs a face embedding: choose its .npy file (InsightFace's normed_embedding)");
    }
    const { picture, initial } = face && !controlState.ipPicture      // FaceID Plus takes the initial image)
      ? { picture: null, initial: true } : pictureOf(controlState.ipPicture, "IP-Adapter");
    const start = controlNumber("ipa_start", "IP-Adapter"), end = controlNumber("ipa_end", "IP-Adapter");
    const shortcut = controlNumber("ipa_face_shortcut", "IP-Adapter");
    body.ip_adapters = [{ model: $("ipa_model").value, ...(initial ? {} : { image: base64Of(picture) }),
      ...(face ? { face_embedding: face.data } : {}),
      ...(shortcut !== undefined ? { face_shortcut: shortcut } : {}),
      scale: controlNumber("ipa_scale", "IP-Adapter"),
      ...(start ? { start } : {}), ...(end !== undefined && end !== 1 ? { end } : {}),    // every step: left out
      ...($("ipa_layers").value ? { layer_scales: $("ipa_layers").value } : {}),
      ...($("ipa_module").value ? { module: $("ipa_module").value } : {}),
      ...($("ipa_resize_mode").value ? { resize_mode: $("ipa_resize_mode").value } : {}) }];
  }
  return body;
}

// The IP-Adapter's Layers set to a job's or a picture's `layer_scales`: a preset, or another spelling (the compact
// text the server records) added as an option of its own; none: All
function setIpLayers(layers) {
  const select = $("ipa_layers");
  const wanted = typeof layers === "string" ? layers : "";
  if (![...select.options].some((o) => o.value === wanted)) {
    select.append(element("option", { value: wanted, textContent: wanted }));
  }
  select.value = wanted;
}

// Select the model a job or a picture names: a list title ("name [hash]"), else the same name without its hash or
// file suffix (a job records the file name), in any case
function selectControlModel(select, wanted) {
  const stem = (name) => String(name).replace(/\s*\[[0-9a-f]+\]\s*$/i, "").replace(/\.(safetensors|pth|pt|ckpt|bin)$/i, "")
    .trim().toLowerCase();
  const found = [...select.options].find((o) => o.value === wanted)
    || [...select.options].find((o) => o.value && stem(o.value) === stem(wanted));
  if (found) select.value = found.value;
  return Boolean(found);
}

// Settings' `controls` (a job's request, or a picture's ControlNet N lines) enable and fill the units in order, or
// each the unit its line names (`control_units`, a picture's N: A1111's paste keeps the unit), `ip_adapters` the
// IP-Adapter box; a field a unit does not name takes its default (UNIT_DEFAULTS), as the extension reads an older
// line, but a threshold or Processor res a job records as null (the preprocessor's default) leaves its box empty
// (its placeholder names the default), so the job sent again has null there too; units they do not fill are
// unticked (their values stay), and so is one whose model the server has not (named: the form draws without it).
// Each filled unit shows every Control Type. The pictures stay: neither a job nor a picture holds them.
function fillControls(settings, unknown) {
  const controls = Array.isArray(settings.controls) ? settings.controls : [];
  const numbers = Array.isArray(settings.control_units) ? settings.control_units : controls.map((_, index) => index);
  for (let i = 0; i < CONTROL_UNIT_COUNT; i++) {
    const p = `cn${i}`;
    const unit = controls[numbers.indexOf(i)];
    $(`${p}_enabled`).checked = Boolean(unit);
    if (!unit) {
      showUnitState(i);
      continue;
    }
    $(p).open = true;
    chooseControlType(i, "All", false);
    if (!selectControlModel($(`${p}_model`), unit.model)) {
      unknown.push(`ControlNet ${i} model "${unit.model}"`);
      $(`${p}_enabled`).checked = false;
    }
    if (!selectMatching($(`${p}_module`), unit.module ?? "none")) unknown.push(`preprocessor "${unit.module}"`);
    showModuleSliders(i);
    const values = { weight: unit.strength, start: unit.start, end: unit.end, control_mode: unit.control_mode,
      resize_mode: unit.resize_mode };
    for (const [key, value] of Object.entries(values)) setField(`${p}_${key}`, value ?? UNIT_DEFAULTS[key]);
    for (const key of ["threshold_a", "threshold_b", "processor_res"]) {    // unnamed: the slider's, UNIT_DEFAULTS'
      if (unit[key] !== undefined) $(`${p}_${key}`).value = unit[key] ?? "";
      else setField(`${p}_${key}`, UNIT_DEFAULTS[key]);
    }
    $(`${p}_pixel_perfect`).checked = unit.pixel_perfect === true;
    showUnitState(i);
  }
  const past = numbers.filter((n) => !(n >= 0 && n < CONTROL_UNIT_COUNT)).length;
  if (past) unknown.push(`${past} ControlNet units past ${CONTROL_UNIT_COUNT}`);
  const prompts = Array.isArray(settings.ip_adapters) ? settings.ip_adapters : [];
  const found = prompts.length > 0 && selectControlModel($("ipa_model"), prompts[0].model);
  if (prompts.length && !found) unknown.push(`IP-Adapter model "${prompts[0].model}"`);
  $("ipa_enabled").checked = found;
  $("ipa-options").hidden = !found;
  if (!prompts.length) return;
  $("ipa_scale").value = prompts[0].scale ?? 1;
  $("ipa_start").value = prompts[0].start ?? 0;                      // a job or a picture of every step: none
  $("ipa_end").value = prompts[0].end ?? 1;
  setIpLayers(prompts[0].layer_scales);
  $("ipa_face_shortcut").value = prompts[0].face_shortcut ?? "";     // the face embedding stays, as the picture
  if (!selectMatching($("ipa_module"), prompts[0].module ?? "")) unknown.push(`IP-Adapter module "${prompts[0].module}"`);
  if (!selectMatching($("ipa_resize_mode"), prompts[0].resize_mode ?? "")) {
    unknown.push(`IP-Adapter resize mode "${prompts[0].resize_mode}"`);
  }
  if (prompts.length > 1) unknown.push(`${prompts.length - 1} IP-Adapters past the first`);
}

// The Processor res a unit's Preview runs at: Pixel perfect's from the picture's and the drawing's size where it is
// ticked (as the extension's preview), else the box's
async function previewResolution(i, picture, initial, processorRes) {
  if (!$(`cn${i}_pixel_perfect`).checked) return processorRes;
  const size = await effectiveSize();
  const image = await loadImage(picture);
  return pixelPerfectResolution(image.naturalWidth, image.naturalHeight, size.width, size.height,
    unitResizeMode(i, initial));
}

// Preview: the unit's picture (or the initial image) through its preprocessor, as the job's unit would see it (the
// whole picture, before the resize mode cuts it, as the extension's preview). The button waits while the server
// works; a failed preview leaves no earlier map shown.
async function previewControl(i) {
  const p = `cn${i}`;
  const what = `ControlNet Unit ${i}`;
  showError("");
  $(`${p}_preview`).hidden = true;
  $(`${p}_preview_button`).disabled = true;
  try {
    const { picture, initial } = pictureOf(controlState.pictures[i], what);
    const { module, threshold_a, threshold_b, processor_res } = preprocessorFields(i, what);
    const resolution = RESOLUTION_MODULES.includes(module)
      ? await previewResolution(i, picture, initial, processor_res) : null;
    const read = await api("/controlnet/detect", { method: "POST", body: {
      controlnet_module: module, controlnet_input_images: [base64Of(picture)], controlnet_processor_res: resolution,
      controlnet_threshold_a: threshold_a ?? -1, controlnet_threshold_b: threshold_b ?? -1 } });
    $(`${p}_preview`).src = `data:image/png;base64,${read.images[0]}`;
    $(`${p}_preview`).hidden = false;
  } catch (err) {
    // the page's own errors name the unit already; the server's get its name
    showError(`Preview of ${err.message.startsWith(what) ? err.message : `${what}: ${err.message}`}`);
  } finally {
    $(`${p}_preview_button`).disabled = false;
  }
}

function wirePictureBox(prefix) {
  $(`${prefix}_file`).addEventListener("change", async () => {
    const file = $(`${prefix}_file`).files[0];
    try { if (file) await setControlPicture(prefix, await readFile(file)); } catch (err) { showError(err.message); }
    $(`${prefix}_file`).value = "";
  });
  $(`${prefix}_clear`).addEventListener("click", () => setControlPicture(prefix, null));
}

// The IP-Adapter's face embedding (a FaceID's: sent as the native face_embedding, the server reads the .npy), or
// none; its file's name shown
function setIpFace(face) {
  controlState.ipFace = face;
  $("ipa_face_name").textContent = face ? `Face embedding: ${face.name}`
    : "No face embedding (FaceID: InsightFace's, a .npy file)";
}

// Build the units, wire their controls (the lists load with the page's: loadLists)
function setupControls() {
  const units = $("cn-units");
  for (let i = 0; i < CONTROL_UNIT_COUNT; i++) {
    units.append(controlUnit(i));
    wirePictureBox(`cn${i}`);
    $(`cn${i}_module`).addEventListener("change", () => { showModuleSliders(i); showUnitState(i); });
    $(`cn${i}_enabled`).addEventListener("change", () => showUnitState(i));
    $(`cn${i}_pixel_perfect`).addEventListener("change", () => showUnitState(i));
    $(`cn${i}_preview_button`).addEventListener("click", () => previewControl(i));
    $(`cn${i}_types`).addEventListener("change",
      (event) => refreshControlTypes(() => chooseControlType(i, event.target.value, true)));
  }
  $("ipa-picture").append(...pictureBox("ipa", "IP-Adapter", "IP-Adapter picture (none: img2img's initial image)"));
  wirePictureBox("ipa");
  $("ipa_face_file").addEventListener("change", async () => {
    const file = $("ipa_face_file").files[0];
    try {
      if (file) setIpFace({ name: file.name, data: base64Of(await readFile(file)) });
    } catch (err) {
      showError(err.message);
    }
    $("ipa_face_file").value = "";
  });
  $("ipa_face_clear").addEventListener("click", () => setIpFace(null));
  $("ipa_enabled").addEventListener("change", () => { $("ipa-options").hidden = !$("ipa_enabled").checked; });
  $("model").addEventListener("change", () => refreshControlTypes(() => {
    for (let i = 0; i < CONTROL_UNIT_COUNT; i++) fillUnitLists(i);
  }));
  $("cn-refresh").addEventListener("click", async () => {
    try { await loadControlLists(); } catch (err) { showError(err.message); }
  });
}
