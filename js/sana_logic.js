// Pure logic of the SANA frontend extension: no DOM, no ComfyUI imports, so the browser
// (through sana.js) and Node's test runner (tests/js/) load the same file.
//
// The aspect-ratio bins are NOT copied here. The one table lives in sana_core/resolution.py; the
// SanaEmptyLatent node sends it as its preset input's "trained_sizes" option (read by trainedSizes()),
// and its preset labels ("1024px · 16:9 · 1344x768") carry their sizes (read by presetsFromOptions()).

export const LATENT_FACTOR = 32 // DC-AE f32c32: one latent pixel per 32x32 image pixels
export const BIN_SIDES = [512, 1024, 2048, 4096] // the four bins, named by the side of their square size

// Model folders each SANA loader lists its files from (ComfyUI folder_paths names).
export const LOADER_FOLDERS = {
  SanaModelLoader: ['diffusion_models', 'checkpoints'],
  SanaTextEncoderLoader: ['text_encoders'],
  SanaVAELoader: ['vae'],
  SanaLoraLoader: ['loras']
}

/** Nearest multiple of 32 to `value`, kept inside [min, max] (themselves rounded inward to multiples of 32). */
export function snap32(value, min = LATENT_FACTOR, max = Infinity) {
  const lo = Math.max(LATENT_FACTOR, Math.ceil(min / LATENT_FACTOR) * LATENT_FACTOR)
  const hi = Math.floor(max / LATENT_FACTOR) * LATENT_FACTOR
  const v = Number(value)
  if (!Number.isFinite(v)) return lo
  return Math.min(hi, Math.max(lo, Math.round(v / LATENT_FACTOR) * LATENT_FACTOR))
}

/** Latent grid and DiT sequence length for an image size (patch size 1: one token per latent pixel). */
export function latentTokens(width, height) {
  const latentWidth = Math.floor(width / LATENT_FACTOR)
  const latentHeight = Math.floor(height / LATENT_FACTOR)
  return { latentWidth, latentHeight, tokens: latentWidth * latentHeight }
}

/** The bin whose square size is nearest to width x height in log-area (512 | 1024 | 2048 | 4096). */
export function binForArea(width, height) {
  const area = Math.log(width * height)
  return BIN_SIDES.reduce((best, side) =>
    Math.abs(Math.log(side * side) - area) < Math.abs(Math.log(best * best) - area) ? side : best
  )
}

const BIN_NAMES = { '512': 512, '1024': 1024, '2048': 2048, '4096': 4096, '1k': 1024, '2k': 2048, '4k': 4096 }

/**
 * One preset label -> { label, bin, width, height }, or null for labels without a size ("custom").
 * Reads "WxH" (x or ×); the bin is a leading "512" / "1024px" / "2048" / "4096" / "1K" / "2K" / "4K"
 * when the label starts with one followed by a separator ("1024px · 16:9 · 1344x768", round 1's
 * "1024: 1344x768 (7:4)"), else the bin nearest in area.
 */
export function parsePreset(label) {
  if (typeof label !== 'string') return null
  const size = label.match(/(\d+)\s*[x×]\s*(\d+)/i)
  if (!size) return null
  const width = Number(size[1])
  const height = Number(size[2])
  if (!(width > 0 && height > 0)) return null
  const prefix = label.slice(0, size.index).match(/^\s*(\d+k?)\s*(?:px)?\s*[:|/\-–,·]/i)
  const bin = (prefix && BIN_NAMES[prefix[1].toLowerCase()]) || binForArea(width, height)
  return { label, bin, width, height }
}

/** All presets of a combo's option list, in list order; labels without a size are skipped. */
export function presetsFromOptions(values) {
  return (Array.isArray(values) ? values : []).map(parsePreset).filter(Boolean)
}

/** The node's "trained_sizes" option {"1024": [[width, height], ...], ...} -> [{ bin, width, height }]. */
export function trainedSizes(table) {
  if (!table || typeof table !== 'object') return []
  return Object.entries(table).flatMap(([bin, sizes]) =>
    (Array.isArray(sizes) ? sizes : []).map(([width, height]) => ({ bin: Number(bin), width, height }))
  )
}

/** Options that carry no size (e.g. "custom"): what to select when width/height match no preset. */
export function customOptions(values) {
  return (Array.isArray(values) ? values : []).filter((v) => parsePreset(v) === null)
}

/**
 * The preset label to show for a hand-edited width x height: the current one if it still matches,
 * else the first preset of that size, else the first size-less option ("custom"), else null (leave it).
 */
export function presetForSize(values, width, height, current) {
  const presets = presetsFromOptions(values)
  const same = (p) => p.width === width && p.height === height
  const now = presets.find((p) => p.label === current)
  if (now && same(now)) return current
  const match = presets.find(same)
  if (match) return match.label
  const custom = customOptions(values)
  return custom.length ? custom[0] : null
}

/**
 * What a node saved with an older preset label that is no longer listed (round 1's "1024: 1344x768 (7:4)")
 * shows instead: { preset, width, height } with the listed preset of that size, or the first size-less
 * option ("custom") and that size, so the node still makes what it made. null when `value` is listed or
 * names no size (the server then says what is wrong).
 */
export function upgradePreset(values, value) {
  if (!Array.isArray(values) || values.includes(value)) return null
  const old = parsePreset(value)
  if (!old) return null
  const preset = presetForSize(values, old.width, old.height, null)
  return preset === null ? null : { preset, width: old.width, height: old.height }
}

/**
 * height / width rounded to 2 decimals as Python's round() does it: the key of the size in the
 * diffusers/sana_core bin tables ("0.57" for 768x1344). toFixed agrees with Python except on exact
 * ties (a ratio like 3.625 that a double holds exactly), which Python rounds half to even.
 */
export function ratioKey(width, height) {
  const ratio = height / width
  const twice = Math.round(ratio * 200) // 2k + 1 when ratio may sit exactly on k.5 hundredths
  if (twice % 2 === 1 && twice % 25 === 0 && twice / 200 === ratio) {
    const k = (twice - 1) / 2
    return (k % 2 === 0 ? k : k + 1) / 100
  }
  return Number(ratio.toFixed(2))
}

/**
 * The model's native size for width x height: the bin nearest in area, and in it the size whose
 * ratio key is nearest to height / width (diffusers' classify_height_width_bin and sana_core's
 * binned_size; on a tie the smaller key, as their min over the ascending table picks).
 * `trained`: [{ bin, width, height }] (trainedSizes()). Returns { bin, width, height, exact }, or null
 * when `trained` holds no size of that bin.
 */
export function nativeBin(trained, width, height) {
  const bin = binForArea(width, height)
  const ratio = height / width
  let best = null
  let bestDistance = Infinity
  for (const p of trained) {
    if (p.bin !== bin) continue
    const key = ratioKey(p.width, p.height)
    const distance = Math.abs(key - ratio)
    if (distance < bestDistance || (distance === bestDistance && key < ratioKey(best.width, best.height))) {
      best = p
      bestDistance = distance
    }
  }
  if (!best) return null
  return { bin, width: best.width, height: best.height, exact: best.width === width && best.height === height }
}

function binName(side) {
  return side >= 2048 ? `${side / 1024}K` : String(side)
}

/** The lines SanaEmptyLatent shows under its widgets; `trained` as for nativeBin(). */
export function latentInfoLines(trained, width, height) {
  const w = Number(width)
  const h = Number(height)
  if (!(w > 0 && h > 0)) return []
  const { latentWidth, latentHeight, tokens } = latentTokens(w, h)
  const lines = [`latent ${latentWidth}×${latentHeight} · ${tokens.toLocaleString('en-US')} tokens`]
  const native = nativeBin(trained, w, h)
  if (native && native.exact) lines.push(`native ${binName(native.bin)} bin size ✓`)
  else if (native) lines.push(`${binName(native.bin)} bin: nearest native ${native.width}×${native.height}`)
  return lines
}

function formatSeconds(s) {
  if (s < 1) return `${(s * 1000).toFixed(s < 0.1 ? 1 : 0)} ms`
  return `${s.toFixed(s < 10 ? 2 : 1)} s`
}

/**
 * The lines SanaSampler shows after a run, from the node's UI output
 * {"sana_stats": [{seconds_per_step, total_seconds, peak_gpu_memory_gib, steps?, device?, ...}]}.
 * A null/absent peak means the run had no GPU (CPU run).
 */
export function statsLines(stats) {
  if (!stats || typeof stats !== 'object') return []
  const number = (v) => (v === null || v === undefined || !Number.isFinite(Number(v)) ? null : Number(v))
  const perStep = number(stats.seconds_per_step)
  const total = number(stats.total_seconds)
  const peak = number(stats.peak_gpu_memory_gib)
  if (perStep === null && total === null) return []
  const lines = []
  const steps = number(stats.steps)
  if (perStep !== null) lines.push(`${formatSeconds(perStep)} / step` + (steps !== null ? ` (${steps} steps)` : ''))
  if (total !== null) lines.push(`${formatSeconds(total)} total`)
  const ranOn = typeof stats.device === 'string' && stats.device ? `ran on ${stats.device}` : 'no GPU'
  lines.push(peak === null ? `peak GPU memory: – (${ranOn})` : `peak GPU memory ${peak.toFixed(2)} GiB`)
  return lines
}

/**
 * `text` broken into lines no wider than `maxWidth` (as `measure(text)` reports widths): at spaces,
 * and after a "/" inside a long path. A single piece wider than maxWidth gets a line of its own.
 */
export function wrapText(text, maxWidth, measure) {
  const lines = []
  let line = ''
  for (const piece of String(text).split(/(?<= )|(?<=\/)/)) {
    if (line && measure((line + piece).trimEnd()) > maxWidth) {
      lines.push(line.trimEnd())
      line = piece
    } else line += piece
  }
  if (line.trim()) lines.push(line.trimEnd())
  return lines
}

/** First entry of the sana_stats list in a node's UI output, or null. */
export function statsFromOutput(output) {
  const list = output && output.sana_stats
  return Array.isArray(list) && list.length ? list[0] : null
}

function basename(path) {
  return String(path).split(/[\\/]/).pop()
}

/**
 * Lines a loader shows when the file its widget names is not among the installed ones, or [] when it is.
 * `folders`: the ComfyUI folder names the loader lists (LOADER_FOLDERS); `folderPaths`: the server's
 * {folder: [absolute dirs]} (GET /internal/folder_paths), or {} when unknown.
 */
export function missingModelLines(value, installed, folders, folderPaths = {}) {
  const options = Array.isArray(installed) ? installed : []
  if (typeof value === 'string' && value !== '' && options.includes(value)) return []
  // ComfyUI lists models/unet before models/diffusion_models: name the folder's own directory first.
  const dir = (f) => {
    const dirs = Array.isArray(folderPaths[f]) ? folderPaths[f] : []
    return dirs.find((d) => basename(d) === f) || dirs[0] || `models/${f}`
  }
  const where = folders.map(dir)
  const lines = []
  if (typeof value === 'string' && value !== '') lines.push(`⚠ not installed: ${value}`)
  else lines.push('⚠ no model file installed')
  lines.push(`put it in ${where.join(' or ')}`)
  const sameName = typeof value === 'string' && options.find((o) => basename(o) === basename(value))
  if (sameName) lines.push(`(installed under another path: ${sameName})`)
  return lines
}

/** What SanaSampler's flow_shift shows instead of its number: 0 means the model's own shift. */
export function flowShiftText(value) {
  return Number(value) === 0 ? '0 = model default' : null
}

// --- Layout: which nodes of a graph cover each other or fall outside the view.

/** A node's rectangle in canvas units, title bar included: [x, y, width, height]. */
export function nodeBox(pos, size, titleHeight) {
  return [pos[0], pos[1] - titleHeight, size[0], size[1] + titleHeight]
}

/** [[idA, idB], ...] for every two of `boxes` ({ id, box }) that overlap by more than `tolerance` on both axes. */
export function overlaps(boxes, tolerance = 0) {
  const pairs = []
  boxes.forEach((a, i) => {
    for (const b of boxes.slice(i + 1)) {
      const dx = Math.min(a.box[0] + a.box[2], b.box[0] + b.box[2]) - Math.max(a.box[0], b.box[0])
      const dy = Math.min(a.box[1] + a.box[3], b.box[1] + b.box[3]) - Math.max(a.box[1], b.box[1])
      if (dx > tolerance && dy > tolerance) pairs.push([a.id, b.id])
    }
  })
  return pairs
}

/** The canvas area a view shows: LiteGraph's DragAndScale { offset, scale } over a width x height element. */
export function viewBox(offset, scale, width, height) {
  return [-offset[0], -offset[1], width / scale, height / scale]
}

/** Ids of `boxes` ({ id, box }) not wholly inside `view` ([x, y, width, height]). */
export function outsideView(boxes, view) {
  const [x, y, w, h] = view
  return boxes
    .filter(({ box }) => box[0] < x || box[1] < y || box[0] + box[2] > x + w || box[1] + box[3] > y + h)
    .map(({ id }) => id)
}
