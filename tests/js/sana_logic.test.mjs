// Pure logic of the frontend extension (js/sana_logic.js): preset parsing, snapping, token counts,
// native-bin lookup, stats and missing-model messages. Run: node --test tests/js/
import assert from 'node:assert/strict'
import { test } from 'node:test'

import {
  binForArea,
  customOptions,
  latentInfoLines,
  latentTokens,
  missingModelLines,
  nativeBin,
  parsePreset,
  presetForSize,
  presetsFromOptions,
  ratioKey,
  snap32,
  statsFromOutput,
  statsLines,
  wrapText
} from '../../js/sana_logic.js'

// A few labels in the node's format plus a size-less "custom" option (sizes from diffusers' bins).
const OPTIONS = [
  'custom',
  '512: 512x512 (1:1)',
  '512: 384x672 (4:7)',
  '1024: 1024x1024 (1:1)',
  '1024: 768x1344 (4:7)',
  '1024: 1344x768 (7:4)',
  '1024: 896x1152 (7:9)',
  '2048: 2048x2048 (1:1)',
  '2048: 1536x2688 (4:7)',
  '4096: 4096x4096 (1:1)',
  '4096: 3072x5376 (4:7)'
]

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
  assert.equal(presets[0].label, '512: 512x512 (1:1)')
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
  assert.equal(presetForSize(OPTIONS, 1024, 1024, '1024: 1024x1024 (1:1)'), '1024: 1024x1024 (1:1)')
  assert.equal(presetForSize(OPTIONS, 1344, 768, 'custom'), '1024: 1344x768 (7:4)')
  assert.equal(presetForSize(OPTIONS, 1000, 1024, '1024: 1024x1024 (1:1)'), 'custom')
  assert.equal(presetForSize(OPTIONS.slice(1), 1000, 1024, '1024: 1024x1024 (1:1)'), null) // no custom option: leave it
})

test('nativeBin: nearest aspect ratio inside the area bin, like diffusers classify_height_width_bin', () => {
  const presets = presetsFromOptions(OPTIONS)
  assert.deepEqual(nativeBin(presets, 1024, 1024), { bin: 1024, width: 1024, height: 1024, exact: true })
  // 800x1200: ratio 1.5; nearest of {1, 0.57->1.75, 1.75->0.57, 1.29} by h/w is 896x1152 (h/w 1.286).
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
  const presets = presetsFromOptions(OPTIONS)
  assert.deepEqual(latentInfoLines(presets, 1024, 1024), ['latent 32×32 · 1,024 tokens', 'native 1024 bin size ✓'])
  assert.deepEqual(latentInfoLines(presets, 800, 1088), ['latent 25×34 · 850 tokens', '1024 bin: nearest native 896×1152'])
  assert.deepEqual(latentInfoLines(presets, 4096, 4096), ['latent 128×128 · 16,384 tokens', 'native 4K bin size ✓'])
  assert.deepEqual(latentInfoLines([], 64, 64), ['latent 2×2 · 4 tokens']) // no presets: no bin line
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
