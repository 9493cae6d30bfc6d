// Pure logic of the frontend extension (js/sana_logic.js): preset parsing, snapping, token counts,
// native-bin lookup, stats, missing-model messages and the layout check. Run: node --test tests/js/
import assert from 'node:assert/strict'
import { test } from 'node:test'

import {
  binForArea,
  customOptions,
  flowShiftText,
  latentInfoLines,
  latentTokens,
  missingModelLines,
  nativeBin,
  nodeBox,
  outsideView,
  overlaps,
  parsePreset,
  presetForSize,
  presetsFromOptions,
  ratioKey,
  snap32,
  statsFromOutput,
  statsLines,
  trainedSizes,
  upgradePreset,
  viewBox,
  wrapText
} from '../../js/sana_logic.js'

// A few labels in the node's format plus a size-less "custom" option (sizes from diffusers' bins).
const OPTIONS = [
  'custom',
  '1024px · 16:9 · 1344x768',
  '1024px · 1:1 · 1024x1024',
  '1024px · 3:4 · 896x1152',
  '1024px · 9:16 · 768x1344',
  '2K · 1:1 · 2048x2048',
  '2K · 9:16 · 1536x2688',
  '4K · 1:1 · 4096x4096',
  '4K · 9:16 · 3072x5376',
  '512px · 1:1 · 512x512',
  '512px · 9:16 · 384x672'
]
// A few trained sizes per bin, as the node's "trained_sizes" option sends them.
const TRAINED = trainedSizes({
  512: [[512, 512], [384, 672]],
  1024: [[1344, 768], [1024, 1024], [896, 1152], [768, 1344], [960, 1024]],
  2048: [[2048, 2048], [1536, 2688]],
  4096: [[4096, 4096], [3072, 5376]]
})

test('snap32 rounds to the nearest multiple of 32 inside the widget range', () => {
  assert.equal(snap32(1000), 992)
  assert.equal(snap32(1010), 1024)
  assert.equal(snap32(1024), 1024)
  assert.equal(snap32(15), 32) // never below one latent pixel
  assert.equal(snap32(9000, 32, 8192), 8192)
  assert.equal(snap32(100, 256, 4096), 256)
  assert.equal(snap32(5000, 32, 4100), 4096) // max rounded inward
  assert.equal(snap32('1040'), 1056) // widget text input
  assert.equal(snap32(Number.NaN, 64), 64)
})

test('latent grid and token count: one DiT token per 32x32 pixels', () => {
  assert.deepEqual(latentTokens(1024, 1024), { latentWidth: 32, latentHeight: 32, tokens: 1024 })
  assert.deepEqual(latentTokens(768, 1344), { latentWidth: 24, latentHeight: 42, tokens: 1008 })
  assert.equal(latentTokens(4096, 4096).tokens, 16384)
})

test('parsePreset reads width x height and the bin from a label', () => {
  assert.deepEqual(parsePreset('1024px · 9:16 · 768x1344'), { label: '1024px · 9:16 · 768x1344', bin: 1024, width: 768, height: 1344 })
  assert.equal(parsePreset('2K · 16:9 · 2688x1536').bin, 2048)
  assert.equal(parsePreset('4K · 4:1 · 8192x2048').width, 8192)
  assert.equal(parsePreset('512px · 1:1 · 512x512').bin, 512)
  // Round 1's labels, still in saved workflows.
  assert.deepEqual(parsePreset('1024: 768x1344 (4:7)'), { label: '1024: 768x1344 (4:7)', bin: 1024, width: 768, height: 1344 })
  assert.equal(parsePreset('2K: 2048 x 1152').bin, 2048)
  assert.equal(parsePreset('4K | 4096×4096').bin, 4096)
  assert.equal(parsePreset('512px - 512x512').bin, 512)
  // No bin prefix: the bin nearest in area.
  assert.deepEqual(parsePreset('896x1152 (7:9)'), { label: '896x1152 (7:9)', bin: 1024, width: 896, height: 1152 })
  assert.equal(parsePreset('custom'), null)
  assert.equal(parsePreset(''), null)
  assert.equal(parsePreset(42), null)
})

test('presetsFromOptions keeps list order and skips size-less options', () => {
  const presets = presetsFromOptions(OPTIONS)
  assert.equal(presets.length, OPTIONS.length - 1)
  assert.equal(presets[0].label, '1024px · 16:9 · 1344x768')
  assert.deepEqual(customOptions(OPTIONS), ['custom'])
  assert.deepEqual(presetsFromOptions(undefined), [])
})

test('binForArea picks the nearest of 512/1024/2048/4096 in log-area', () => {
  assert.equal(binForArea(512, 512), 512)
  assert.equal(binForArea(1344, 768), 1024)
  assert.equal(binForArea(1440, 1440), 1024) // below the geometric midpoint 1448
  assert.equal(binForArea(1472, 1472), 2048)
  assert.equal(binForArea(8192, 2048), 4096)
})

test('presetForSize: keeps the current preset, else the first of that size, else custom', () => {
  assert.equal(presetForSize(OPTIONS, 1024, 1024, '1024px · 1:1 · 1024x1024'), '1024px · 1:1 · 1024x1024')
  assert.equal(presetForSize(OPTIONS, 1344, 768, 'custom'), '1024px · 16:9 · 1344x768')
  assert.equal(presetForSize(OPTIONS, 1000, 1024, '1024px · 1:1 · 1024x1024'), 'custom')
  assert.equal(presetForSize(OPTIONS.slice(1), 1000, 1024, '1024px · 1:1 · 1024x1024'), null) // no custom option: leave it
})

test("upgradePreset: a round-1 label shows as today's preset of its size, or custom with that size", () => {
  assert.deepEqual(upgradePreset(OPTIONS, '1024: 1344x768 (7:4)'), { preset: '1024px · 16:9 · 1344x768', width: 1344, height: 768 })
  assert.deepEqual(upgradePreset(OPTIONS, '4096: 4096x4096 (1:1)'), { preset: '4K · 1:1 · 4096x4096', width: 4096, height: 4096 })
  // A trained size no ratio preset names: custom, with the size the preset made.
  assert.deepEqual(upgradePreset(OPTIONS, '1024: 960x1024 (15:16)'), { preset: 'custom', width: 960, height: 1024 })
  assert.equal(upgradePreset(OPTIONS, '1024px · 1:1 · 1024x1024'), null) // listed: nothing to do
  assert.equal(upgradePreset(OPTIONS, 'custom'), null)
  assert.equal(upgradePreset(OPTIONS, 'something else'), null) // no size: left for the server to name
})

test('trainedSizes reads the node option {bin: [[w, h], ...]}', () => {
  assert.deepEqual(trainedSizes({ 2048: [[2048, 2048]] }), [{ bin: 2048, width: 2048, height: 2048 }])
  assert.deepEqual(trainedSizes(undefined), [])
})

test('nativeBin: nearest aspect ratio inside the area bin, like diffusers classify_height_width_bin', () => {
  const presets = TRAINED
  assert.deepEqual(nativeBin(presets, 1024, 1024), { bin: 1024, width: 1024, height: 1024, exact: true })
  assert.deepEqual(nativeBin(presets, 960, 1024), { bin: 1024, width: 960, height: 1024, exact: true }) // in no preset
  // 800x1200: ratio 1.5; nearest of {0.57, 1, 1.07, 1.29, 1.75} by h/w is 896x1152 (h/w 1.286).
  assert.deepEqual(nativeBin(presets, 800, 1200), { bin: 1024, width: 896, height: 1152, exact: false })
  assert.deepEqual(nativeBin(presets, 1600, 2800), { bin: 2048, width: 1536, height: 2688, exact: false })
  assert.equal(nativeBin([], 1024, 1024), null)
})

test('ratioKey is the bin-table key: height / width rounded like Python round(x, 2)', () => {
  assert.equal(ratioKey(1344, 768), 0.57)
  assert.equal(ratioKey(960, 1024), 1.07)
  assert.equal(ratioKey(1024, 3712), 3.62) // exact tie 3.625: half to even, as in the table
  assert.equal(ratioKey(1024, 3968), 3.88) // exact tie 3.875
})

test('latentInfoLines: token count, then native size or the nearest native one', () => {
  const presets = TRAINED
  assert.deepEqual(latentInfoLines(presets, 1024, 1024), ['latent 32×32 · 1,024 tokens', 'native 1024 bin size ✓'])
  assert.deepEqual(latentInfoLines(presets, 800, 1088), ['latent 25×34 · 850 tokens', '1024 bin: nearest native 896×1152'])
  assert.deepEqual(latentInfoLines(presets, 4096, 4096), ['latent 128×128 · 16,384 tokens', 'native 4K bin size ✓'])
  assert.deepEqual(latentInfoLines([], 64, 64), ['latent 2×2 · 4 tokens']) // no trained sizes: no bin line
  assert.deepEqual(latentInfoLines(presets, 0, 64), [])
})

test('statsLines formats the sampler UI output', () => {
  const output = { sana_stats: [{ seconds_per_step: 0.0412, total_seconds: 0.84, peak_gpu_memory_gib: 10.123 }] }
  assert.deepEqual(statsLines(statsFromOutput(output)), ['41.2 ms / step', '840 ms total', 'peak GPU memory 10.12 GiB'])
  assert.deepEqual(statsLines({ seconds_per_step: 1.5, total_seconds: 31.25, peak_gpu_memory_gib: null }), [
    '1.50 s / step',
    '31.3 s total',
    'peak GPU memory: – (no GPU)'
  ])
  // What SanaSampler sends (nodes/sampling.py): extra keys name the step count and the device.
  const cpuRun = { seconds_per_step: 0.012, total_seconds: 0.5, peak_gpu_memory_gib: null, steps: 2, sampler: 'flow_dpm_solver', device: 'cpu' }
  assert.deepEqual(statsLines(cpuRun), ['12.0 ms / step (2 steps)', '500 ms total', 'peak GPU memory: – (ran on cpu)'])
  assert.equal(statsFromOutput({ images: [] }), null)
  assert.equal(statsFromOutput({ sana_stats: [] }), null) // denoise 0: nothing sampled
  assert.equal(statsFromOutput(undefined), null)
  assert.deepEqual(statsLines(null), [])
  assert.deepEqual(statsLines({ peak_gpu_memory_gib: 1 }), []) // no timings: nothing to show
})

test('missingModelLines names the file and the folder it is expected in', () => {
  const installed = ['sana_demo.safetensors', 'sub/sana_1600m.safetensors']
  assert.deepEqual(missingModelLines('sana_demo.safetensors', installed, ['vae']), [])
  assert.deepEqual(missingModelLines('Sana_1600M_1024px.pth', installed, ['diffusion_models', 'checkpoints']), [
    '⚠ not installed: Sana_1600M_1024px.pth',
    'put it in models/diffusion_models or models/checkpoints'
  ])
  const paths = { vae: ['/srv/ComfyUI/models/vae', '/other/vae'] }
  assert.equal(missingModelLines('dc-ae.safetensors', installed, ['vae'], paths)[1], 'put it in /srv/ComfyUI/models/vae')
  const comfyPaths = { diffusion_models: ['/c/models/unet', '/c/models/diffusion_models', '/x/dit'], checkpoints: ['/c/models/checkpoints'] }
  assert.equal(
    missingModelLines('a.pth', installed, ['diffusion_models', 'checkpoints'], comfyPaths)[1],
    'put it in /c/models/diffusion_models or /c/models/checkpoints'
  )
  // Same file name under another sub-folder: point at it.
  assert.equal(missingModelLines('sana_1600m.safetensors', installed, ['diffusion_models'])[2], '(installed under another path: sub/sana_1600m.safetensors)')
  assert.equal(missingModelLines('', [], ['text_encoders'])[0], '⚠ no model file installed')
})

test('wrapText breaks at spaces, and after "/" in long paths', () => {
  const measure = (t) => t.length // one unit per character
  assert.deepEqual(wrapText('latent 32×32 · 1,024 tokens', 40, measure), ['latent 32×32 · 1,024 tokens'])
  assert.deepEqual(wrapText('put it in /home/me/ComfyUI/models/text_encoders', 20, measure), [
    'put it in /home/me/',
    'ComfyUI/models/',
    'text_encoders'
  ])
  assert.deepEqual(wrapText('averyveryverylongfilename.safetensors', 10, measure), ['averyveryverylongfilename.safetensors'])
  assert.deepEqual(wrapText('', 10, measure), [])
})

test('flowShiftText: 0 reads as the model default, other shifts as their number', () => {
  assert.equal(flowShiftText(0), '0 = model default')
  assert.equal(flowShiftText(3), null)
  assert.equal(flowShiftText(0.5), null)
})

test('layout: node boxes include the title bar; overlapping pairs and nodes outside the view are found', () => {
  const box = (id, pos, size) => ({ id, box: nodeBox(pos, size, 30) })
  assert.deepEqual(nodeBox([10, 50], [200, 100], 30), [10, 20, 200, 130])
  // The Model Loader's warning lines reaching under the Text Encoder Loader's title (round 1's first load).
  const loaders = [box(2, [0, 0], [320, 138]), box(3, [0, 150], [320, 106]), box(4, [0, 340], [320, 58])]
  assert.deepEqual(overlaps(loaders), [[2, 3]])
  assert.deepEqual(overlaps([box(2, [0, 0], [320, 110]), ...loaders.slice(1)]), []) // 10 px apart
  assert.deepEqual(overlaps([box(1, [0, 0], [100, 100]), box(2, [99, 0], [100, 100])], 2), []) // within tolerance
  assert.deepEqual(overlaps([box(1, [0, 0], [100, 100]), box(2, [40, 40], [10, 10])]), [[1, 2]]) // one inside the other
  // A 1600 px wide canvas at scale 0.8, offset [480, 60]: canvas x from -480 to 1520.
  const view = viewBox([480, 60], 0.8, 1600, 1000)
  assert.deepEqual(view, [-480, -60, 2000, 1250])
  assert.deepEqual(outsideView([box(1, [-420, 0], [380, 260]), box(10, [1180, 170], [400, 440])], view), [10])
})
