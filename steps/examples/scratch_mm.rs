use candle_core::{Device, Tensor, DType};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    tsr_steps::model::tune_allocator();
    let d = Device::Cpu;
    for (m, k, n) in [(4096usize, 576usize, 1536usize), (4096, 1536, 576), (4096, 576, 576), (16, 576, 1536), (16,576,49152), (128, 576, 49152)] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &d)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &d)?;
        let wt = w.t()?.contiguous()?;
        for (name, rhs) in [("w.t()", w.t()?), ("contig", wt.clone())] {
            let _ = x.matmul(&rhs)?;
            let iters = if m > 1000 { 5 } else { 50 };
            let t = Instant::now();
            for _ in 0..iters { let _ = x.matmul(&rhs)?; }
            let s = t.elapsed().as_secs_f64() / iters as f64;
            println!("{m}x{k}x{n} {name}: {:.2} ms {:.1} GFLOP/s", s * 1e3, 2.0 * (m * k * n) as f64 / s / 1e9);
        }
    }
    // batched attention shapes
    let q = Tensor::randn(0f32, 1.0, (16, 3, 768, 64), &d)?;
    let kk = Tensor::randn(0f32, 1.0, (16, 3, 256, 64), &d)?;
    let t = Instant::now();
    for _ in 0..5 { let _ = q.matmul(&kk.t()?)?; }
    println!("attn qk 16x3x768x64x256: {:.2} ms", t.elapsed().as_secs_f64() / 5.0 * 1e3);
    let a = Tensor::randn(0f32, 1.0, (16, 3, 768, 256), &d)?;
    let t = Instant::now();
    for _ in 0..5 { let _ = candle_nn::ops::softmax_last_dim(&a)?; }
    println!("softmax 16x3x768x256: {:.2} ms", t.elapsed().as_secs_f64() / 5.0 * 1e3);
    let x = Tensor::randn(0f32, 1.0, (16, 256, 1536), &d)?;
    let t = Instant::now();
    for _ in 0..5 { let _ = x.silu()?; }
    println!("silu 16x256x1536: {:.2} ms", t.elapsed().as_secs_f64() / 5.0 * 1e3);
    let t = Instant::now();
    for _ in 0..5 { let _ = (&x * &x)?; }
    println!("mul 16x256x1536: {:.2} ms", t.elapsed().as_secs_f64() / 5.0 * 1e3);
    let _ = DType::F32;
    Ok(())
}
