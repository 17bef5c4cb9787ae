// AudioWorklet processors for the OpenChroma browser client.
//
//  oc-capture: microphone -> mono -> resampled to 24 kHz (anti-aliased) -> pcm16 little-endian batches posted to
//              the main thread ({pcm: ArrayBuffer, samples, level, peak}); {type: "flush"} posts what is pending.
//  oc-player:  gapless playback of 24 kHz Float32 chunks posted by the main thread through a growable ring buffer
//              (resampled to the context's rate if the context does not run at 24 kHz); reports how many 24 kHz
//              samples were actually played; {type: "flush"} drops everything queued at once.

/** Streaming resampler: windowed-sinc low-pass when downsampling, then linear interpolation. */
class Resampler {
  constructor(inRate, outRate) {
    this.step = inRate / outRate;
    this.pos = 0;          // read position, relative to the start of the next block (may be in [-1, 0))
    this.last = 0;         // last (filtered) sample of the previous block
    this.fir = null;
    if (inRate > outRate * 1.01) {
      const taps = 31;
      const fc = (0.45 * outRate) / inRate; // cut-off, cycles per input sample (a little under Nyquist)
      const h = new Float32Array(taps);
      let sum = 0;
      for (let i = 0; i < taps; i++) {
        const m = i - (taps - 1) / 2;
        const sinc = m === 0 ? 2 * fc : Math.sin(2 * Math.PI * fc * m) / (Math.PI * m);
        const w = 0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (taps - 1)) + 0.08 * Math.cos((4 * Math.PI * i) / (taps - 1));
        h[i] = sinc * w;
        sum += h[i];
      }
      for (let i = 0; i < taps; i++) h[i] /= sum;
      this.fir = h;
      this.hist = new Float32Array(taps * 2); // doubled delay line: a contiguous window without modulo
      this.hi = 0;
    }
  }

  reset() {
    this.pos = 0;
    this.last = 0;
    if (this.hist) this.hist.fill(0);
  }

  process(input) {
    let x = input;
    const n = input.length;
    if (n === 0) return new Float32Array(0);
    if (this.step === 1) return input.slice();
    if (this.fir) {
      const h = this.fir, taps = h.length, hist = this.hist;
      x = new Float32Array(n);
      for (let j = 0; j < n; j++) {
        hist[this.hi] = hist[this.hi + taps] = input[j];
        this.hi = (this.hi + 1) % taps;
        let acc = 0;
        for (let k = 0; k < taps; k++) acc += h[k] * hist[this.hi + k];
        x[j] = acc;
      }
    }
    const out = new Float32Array(Math.ceil((n + 1) / this.step) + 1);
    let p = this.pos, o = 0;
    while (p < n - 1) {
      const i = Math.floor(p);
      const f = p - i;
      const a = i < 0 ? this.last : x[i];
      const b = x[i + 1];
      out[o++] = a + (b - a) * f;
      p += this.step;
    }
    this.pos = p - n;
    this.last = x[n - 1];
    return out.subarray(0, o);
  }
}

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.targetRate = opts.targetRate || 24000;
    this.batch = Math.round((this.targetRate * (opts.batchMs || 50)) / 1000);
    this.resampler = new Resampler(sampleRate, this.targetRate);
    this.buf = new Float32Array(this.batch);
    this.fill = 0;
    this.sumSq = 0;
    this.count = 0;
    this.peak = 0;
    this.port.onmessage = (e) => {
      if (e.data && e.data.type === "flush") this.post(true, e.data.id);
    };
  }

  post(flush, id) {
    const n = this.fill;
    const bytes = new ArrayBuffer(n * 2);
    const view = new DataView(bytes);
    for (let i = 0; i < n; i++) {
      const s = Math.max(-1, Math.min(1, this.buf[i]));
      view.setInt16(i * 2, s < 0 ? Math.round(s * 32768) : Math.round(s * 32767), true);
    }
    const level = this.count ? Math.sqrt(this.sumSq / this.count) : 0;
    this.port.postMessage({ pcm: bytes, samples: n, level, peak: this.peak, flush: !!flush, id }, [bytes]);
    this.fill = 0;
    this.sumSq = 0;
    this.count = 0;
    this.peak = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || !input[0]) return true;
    const len = input[0].length;
    let mono = input[0];
    if (input.length > 1) {
      mono = new Float32Array(len);
      for (let c = 0; c < input.length; c++) {
        const ch = input[c];
        for (let i = 0; i < len; i++) mono[i] += ch[i] / input.length;
      }
    }
    for (let i = 0; i < len; i++) {
      const v = mono[i];
      this.sumSq += v * v;
      const a = v < 0 ? -v : v;
      if (a > this.peak) this.peak = a;
    }
    this.count += len;
    const y = this.resampler.process(mono);
    let off = 0;
    while (off < y.length) {
      const take = Math.min(this.batch - this.fill, y.length - off);
      this.buf.set(y.subarray(off, off + take), this.fill);
      this.fill += take;
      off += take;
      if (this.fill === this.batch) this.post(false);
    }
    return true;
  }
}

class PlayerProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.sourceRate = opts.sourceRate || 24000;
    this.ratio = this.sourceRate / sampleRate;        // source samples per output sample
    this.resampler = this.ratio === 1 ? null : new Resampler(this.sourceRate, sampleRate);
    this.ring = new Float32Array(Math.ceil(sampleRate * 8));
    this.read = 0;
    this.size = 0;                                    // queued output samples
    this.played = 0;                                  // source samples played since creation (float)
    this.prime = Math.round(sampleRate * 0.04);       // start (or restart after an underrun) once 40 ms are queued
    this.playing = false;
    this.ended = false;                               // the producer said no more audio follows for now
    this.fade = 0;                                    // samples of fade-out left after a flush
    this.fadeLen = Math.round(sampleRate * 0.004);
    this.lastReport = -1;
    this.sinceReport = 0;
    this.reportEvery = Math.round(sampleRate * 0.02);
    this.wasBusy = false;
    this.port.onmessage = (e) => this.onMessage(e.data || {});
  }

  onMessage(msg) {
    if (msg.type === "push") {
      const y = this.resampler ? this.resampler.process(msg.samples) : msg.samples;
      this.write(y);
      this.ended = false;
    } else if (msg.type === "end") {
      this.ended = true;
    } else if (msg.type === "flush") {
      // Keep a few ms to fade out (no click), drop the rest at once.
      const keep = Math.min(this.size, this.fadeLen);
      this.size = keep;
      this.fade = keep;
      this.playing = keep > 0;
      this.ended = true;
      if (this.resampler) this.resampler.reset();
      this.port.postMessage({ type: "flushed", id: msg.id, played: Math.round(this.played) });
      this.lastReport = Math.round(this.played);
    }
  }

  write(y) {
    const n = y.length;
    if (this.size + n > this.ring.length) {
      let cap = this.ring.length * 2;
      while (cap < this.size + n) cap *= 2;
      const bigger = new Float32Array(cap);
      for (let i = 0; i < this.size; i++) bigger[i] = this.ring[(this.read + i) % this.ring.length];
      this.ring = bigger;
      this.read = 0;
    }
    const cap = this.ring.length;
    let w = (this.read + this.size) % cap;
    const first = Math.min(n, cap - w);
    this.ring.set(y.subarray(0, first), w);
    if (first < n) this.ring.set(y.subarray(first), 0);
    this.size += n;
  }

  process(inputs, outputs) {
    const out = outputs[0];
    const ch0 = out[0];
    const len = ch0.length;
    if (!this.playing && this.size > 0 && (this.size >= this.prime || this.ended)) this.playing = true;
    let produced = 0;
    if (this.playing) {
      const cap = this.ring.length;
      const n = Math.min(len, this.size);
      for (let i = 0; i < n; i++) {
        let v = this.ring[this.read];
        this.read = this.read + 1 === cap ? 0 : this.read + 1;
        if (this.fade > 0) {
          v *= this.fade / (this.fadeLen + 1);
          this.fade--;
        } else {
          produced++;
        }
        ch0[i] = v;
      }
      this.size -= n;
      if (this.size === 0) this.playing = false;
      this.played += produced * this.ratio;
    }
    for (let c = 1; c < out.length; c++) out[c].set(ch0);
    this.sinceReport += len;
    const now = Math.round(this.played);
    const busy = this.size > 0;
    if ((this.sinceReport >= this.reportEvery && now !== this.lastReport) || (this.wasBusy && !busy)) {
      this.sinceReport = 0;
      this.lastReport = now;
      this.port.postMessage({ type: "played", played: now, queued: Math.round(this.size * this.ratio) });
    }
    this.wasBusy = busy;
    return true;
  }
}

registerProcessor("oc-capture", CaptureProcessor);
registerProcessor("oc-player", PlayerProcessor);
