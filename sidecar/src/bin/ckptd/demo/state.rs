//! The synthetic training state of `ckptd demo`: a few hundred MiB of mixed-dtype tensors (float32
//! and bfloat16 weights, float16 norms, int64 counters, uint8 and bool buffers, scalars) that a
//! training step mutates deterministically from a seed. The state after step `s` is a pure function
//! of the seed and `s`, so a restore is checked against a recomputation, never against saved bytes.

use ckpt_core::copy::Device;
use ckpt_core::{DType, TensorMeta};
use ckptd::client::TensorRef;

/// Elements per mutation block.
const BLOCK_ELEMS: usize = 1024;
/// A step touches one block in this many, so a step costs a fraction of a pass over the state.
const PHASES: usize = 16;
/// Width of every matrix in the synthetic model.
const DIM: u64 = 1024;
/// Layers of the synthetic model.
const LAYERS: u64 = 4;
/// Samples per step, for the data-loader position.
const BATCH: i64 = 1024;
/// The fill of a state waiting to be loaded.
const POISON: u8 = 0xA5;

/// How a tensor changes from one step to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// float32 weights: decay plus noise, one block in [`PHASES`] per step.
    Weight,
    /// bfloat16 embeddings: the same rule, rounded to bfloat16.
    Embedding,
    /// float16 norm scales in [0.5, 1), every element every step.
    Norm,
    /// int64 optimizer step counters.
    StepCounter,
    /// int64 scalar: samples the data loader has consumed.
    Position,
    /// float32 scalar: the mixed-precision loss scale.
    LossScale,
    /// uint8 data-loader shuffle state, one block in [`PHASES`] per step.
    Shuffle,
    /// bool pruning mask (0 or 1), one block in [`PHASES`] per step.
    Mask,
}

/// The tensors of a synthetic model of about `state_bytes`, with the rule that drives each.
pub fn specs(state_bytes: u64) -> Vec<(TensorMeta, Rule)> {
    // Shares of the state: embeddings 1/4, layer weights 1/2, shuffle state 3/20, mask 1/10.
    let rows = |num: u64, den: u64, elem: u64| (state_bytes / den * num / (DIM * elem)).max(1);
    let meta = |name: String, dtype, shape: Vec<u64>| TensorMeta { name, dtype, shape };
    let mut s = vec![(meta("model.embed.weight".into(), DType::BF16, vec![rows(1, 4, 2), DIM]), Rule::Embedding)];
    for l in 0..LAYERS {
        let w = rows(1, 2 * LAYERS, 4);
        s.push((meta(format!("model.layers.{l}.mlp.weight"), DType::F32, vec![w, DIM]), Rule::Weight));
        s.push((meta(format!("model.layers.{l}.norm.weight"), DType::F16, vec![DIM]), Rule::Norm));
    }
    s.push((meta("optim.step".into(), DType::I64, vec![LAYERS]), Rule::StepCounter));
    s.push((meta("amp.loss_scale".into(), DType::F32, vec![]), Rule::LossScale));
    s.push((meta("data.position".into(), DType::I64, vec![]), Rule::Position));
    s.push((meta("data.shuffle".into(), DType::U8, vec![rows(3, 20, 1), DIM]), Rule::Shuffle));
    s.push((meta("model.prune_mask".into(), DType::Bool, vec![rows(1, 10, 1), DIM]), Rule::Mask));
    s
}

#[derive(Debug, Clone)]
struct Tensor {
    meta: TensorMeta,
    rule: Rule,
    data: Vec<u8>,
}

/// The live training state: separate tensors, like a model's parameters and optimizer state.
#[derive(Debug, Clone)]
pub struct State {
    seed: u64,
    /// Training steps taken since initialisation.
    pub step: u64,
    tensors: Vec<Tensor>,
}

impl State {
    /// The state before the first step, a pure function of `seed`.
    pub fn init(specs: &[(TensorMeta, Rule)], seed: u64) -> State {
        let tensors = specs
            .iter()
            .enumerate()
            .map(|(t, (meta, rule))| {
                // The specs come from `specs`, whose shapes fit in memory by `Config::validate`.
                let len = meta.byte_len().unwrap_or(0) as usize;
                let mut data = vec![0u8; len];
                let key = stream_key(seed, t, 0);
                match rule {
                    Rule::Weight => for_f32(&mut data, 0, key, |_, h| unit(h) * 0.02),
                    Rule::Embedding => for_bf16(&mut data, 0, key, |_, h| unit(h) * 0.02),
                    Rule::Norm => data.chunks_exact_mut(2).for_each(|c| c.copy_from_slice(&0x3c00u16.to_le_bytes())),
                    Rule::LossScale => data.copy_from_slice(&65536f32.to_le_bytes()),
                    Rule::StepCounter | Rule::Position => {}
                    Rule::Shuffle => data.iter_mut().enumerate().for_each(|(i, b)| *b = elem_hash(key, i) as u8),
                    Rule::Mask => data.fill(1),
                }
                Tensor { meta: meta.clone(), rule: *rule, data }
            })
            .collect();
        State { seed, step: 0, tensors }
    }

    /// The state after `step` steps from `seed`, computed from scratch: what a restore must equal.
    pub fn derive(specs: &[(TensorMeta, Rule)], seed: u64, step: u64) -> State {
        let mut s = State::init(specs, seed);
        while s.step < step {
            s.advance();
        }
        s
    }

    /// A state allocated like a model built before its checkpoint is loaded, filled with a byte
    /// pattern that no training step produces everywhere, so a load that misses a byte is caught.
    /// Every page is touched, so a load measures copying rather than page faults.
    pub fn poisoned(specs: &[(TensorMeta, Rule)], seed: u64) -> State {
        let tensors = specs
            .iter()
            .map(|(meta, rule)| Tensor {
                meta: meta.clone(),
                rule: *rule,
                data: vec![POISON; meta.byte_len().unwrap_or(0) as usize],
            })
            .collect();
        State { seed, step: 0, tensors }
    }

    /// Refills every tensor with the poison pattern, for the next load.
    pub fn poison(&mut self) {
        self.tensors.iter_mut().for_each(|t| t.data.fill(POISON));
        self.step = 0;
    }

    /// The tensors as the checkpointer sees them. The addresses stay valid while `self` lives and
    /// no tensor is resized (none ever is).
    pub fn refs(&mut self) -> Vec<TensorRef> {
        self.tensors
            .iter_mut()
            .map(|t| TensorRef {
                name: t.meta.name.clone(),
                dtype: t.meta.dtype,
                shape: t.meta.shape.clone(),
                addr: t.data.as_mut_ptr() as u64,
                device: Device::Cpu,
            })
            .collect()
    }

    /// Bytes of all tensors together.
    pub fn bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.data.len() as u64).sum()
    }

    /// One training step: a deterministic function of the previous state, the seed and the step.
    pub fn advance(&mut self) {
        self.step += 1;
        let step = self.step;
        let phase = (step % PHASES as u64) as usize;
        for (t, tensor) in self.tensors.iter_mut().enumerate() {
            let key = stream_key(self.seed, t, step);
            let size = tensor.meta.dtype.size();
            let data = &mut tensor.data;
            match tensor.rule {
                Rule::Weight => {
                    for (range, first) in phase_blocks(data.len() / size, phase) {
                        for_f32(&mut data[range.start * 4..range.end * 4], first, key, |w, h| {
                            w * 0.999 + unit(h) * 0.01
                        });
                    }
                }
                Rule::Embedding => {
                    for (range, first) in phase_blocks(data.len() / size, phase) {
                        for_bf16(&mut data[range.start * 2..range.end * 2], first, key, |w, h| {
                            w * 0.999 + unit(h) * 0.01
                        });
                    }
                }
                Rule::Norm => {
                    for (i, c) in data.chunks_exact_mut(2).enumerate() {
                        let old = u16::from_le_bytes([c[0], c[1]]);
                        let bits = 0x3800 | ((old ^ elem_hash(key, i) as u16) & 0x03ff);
                        c.copy_from_slice(&bits.to_le_bytes());
                    }
                }
                Rule::StepCounter => {
                    data.chunks_exact_mut(8).for_each(|c| c.copy_from_slice(&(step as i64).to_le_bytes()));
                }
                Rule::Position => data.copy_from_slice(&(step as i64 * BATCH).to_le_bytes()),
                Rule::LossScale => data.copy_from_slice(&((1u32 << (16 - step % 8)) as f32).to_le_bytes()),
                Rule::Shuffle => {
                    for (range, first) in phase_blocks(data.len(), phase) {
                        for (i, b) in data[range].iter_mut().enumerate() {
                            *b ^= elem_hash(key, first + i) as u8;
                        }
                    }
                }
                Rule::Mask => {
                    for (range, first) in phase_blocks(data.len(), phase) {
                        for (i, b) in data[range].iter_mut().enumerate() {
                            *b = (elem_hash(key, first + i) >> 63) as u8;
                        }
                    }
                }
            }
        }
    }

    /// Every tensor that differs from `other`'s, with its first differing byte.
    pub fn diff(&self, other: &State) -> Vec<String> {
        let mut problems = Vec::new();
        if self.step != other.step {
            problems.push(format!("at training step {}, expected {}", self.step, other.step));
        }
        for (a, b) in self.tensors.iter().zip(&other.tensors) {
            if a.data != b.data {
                let first = a.data.iter().zip(&b.data).position(|(x, y)| x != y).unwrap_or(a.data.len());
                let count = a.data.iter().zip(&b.data).filter(|(x, y)| x != y).count();
                problems.push(format!("`{}`: {count} bytes differ, the first at byte {first}", a.meta.name));
            }
        }
        problems
    }
}

/// The element ranges of the blocks a step in `phase` touches, each with its first element.
fn phase_blocks(elems: usize, phase: usize) -> impl Iterator<Item = (std::ops::Range<usize>, usize)> {
    (phase * BLOCK_ELEMS..elems).step_by(BLOCK_ELEMS * PHASES).map(move |s| (s..(s + BLOCK_ELEMS).min(elems), s))
}

/// Rewrites little-endian float32 elements; `first` is the index of the slice's first element.
fn for_f32(bytes: &mut [u8], first: usize, key: u64, f: impl Fn(f32, u64) -> f32) {
    for (i, c) in bytes.chunks_exact_mut(4).enumerate() {
        let old = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        c.copy_from_slice(&f(old, elem_hash(key, first + i)).to_le_bytes());
    }
}

/// Rewrites little-endian bfloat16 elements, computing in float32.
fn for_bf16(bytes: &mut [u8], first: usize, key: u64, f: impl Fn(f32, u64) -> f32) {
    for (i, c) in bytes.chunks_exact_mut(2).enumerate() {
        let old = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
        c.copy_from_slice(&bf16_bits(f(old, elem_hash(key, first + i))).to_le_bytes());
    }
}

/// float32 → bfloat16 with round-to-nearest-even, as torch converts.
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn stream_key(seed: u64, tensor: usize, step: u64) -> u64 {
    mix(seed ^ mix(((tensor as u64) << 40) ^ step))
}

fn elem_hash(key: u64, i: usize) -> u64 {
    mix(key.wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

/// A float in [-1, 1) from a hash.
fn unit(h: u64) -> f32 {
    (h >> 40) as f32 * (1.0 / (1u64 << 23) as f32) - 1.0
}

#[cfg(test)]
mod tests {
    use ckpt_core::TensorTable;
    use ckpt_core::tensor::DEFAULT_ALIGN;

    use super::*;

    #[test]
    fn state_is_deterministic_and_every_step_changes_it() {
        let specs = specs(1 << 20);
        let mut a = State::init(&specs, 7);
        let mut b = State::init(&specs, 7);
        assert!(a.diff(&b).is_empty());
        a.advance();
        assert!(!a.diff(&b).is_empty(), "a step must change the state");
        b.advance();
        assert!(a.diff(&b).is_empty());
        let other = State::init(&specs, 8);
        assert!(!other.diff(&State::init(&specs, 7)).is_empty(), "the seed must matter");
        // Over PHASES steps every block of every large tensor is touched.
        let start = State::init(&specs, 7);
        for _ in 0..PHASES {
            a.advance();
        }
        for (x, y) in a.tensors.iter().zip(&start.tensors) {
            let same = x.data.chunks(BLOCK_ELEMS).zip(y.data.chunks(BLOCK_ELEMS)).filter(|(p, q)| p == q).count();
            assert_eq!(same, 0, "`{}` has untouched blocks", x.meta.name);
        }
    }

    #[test]
    fn specs_cover_the_dtypes_and_the_requested_size() {
        for mib in [1u64, 8, 256] {
            let table = TensorTable::packed(specs(mib << 20).into_iter().map(|(m, _)| m), DEFAULT_ALIGN).unwrap();
            let total = table.total_len();
            assert!(total <= (mib << 20) + (64 << 10) && total >= (mib << 20) * 9 / 10, "{mib} MiB → {total}");
        }
        let dtypes: std::collections::BTreeSet<DType> = specs(1 << 20).iter().map(|(m, _)| m.dtype).collect();
        for d in [DType::F32, DType::BF16, DType::F16, DType::I64, DType::U8, DType::Bool] {
            assert!(dtypes.contains(&d), "{d} missing");
        }
        assert!(specs(1 << 20).iter().any(|(m, _)| m.shape.is_empty()), "no scalar");
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80, "tie rounds to even");
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82, "tie rounds to even");
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert!(f32::from_bits(u32::from(bf16_bits(f32::NAN)) << 16).is_nan());
    }

    #[test]
    fn a_poisoned_state_differs_from_every_trained_one_in_every_tensor() {
        let specs = specs(1 << 20);
        let poisoned = State::poisoned(&specs, 1);
        for step in [0, 1, 17] {
            let trained = State::derive(&specs, 1, step);
            assert_eq!(trained.step, step);
            assert_eq!(poisoned.diff(&State { step: 0, ..trained }).len(), specs.len());
        }
    }

    #[test]
    fn a_diverging_state_names_the_tensor() {
        let specs = specs(1 << 20);
        let a = State::init(&specs, 1);
        let mut b = a.clone();
        b.tensors[3].data[10] ^= 1;
        let p = a.diff(&b);
        assert_eq!(p.len(), 1);
        assert!(p[0].contains(&format!("`{}`: 1 bytes differ, the first at byte 10", a.tensors[3].meta.name)), "{p:?}");
    }
}
