//! The page's redraw without the drawing, N times: with PLAIN set, each call estimating on its own (as before
//! `Page`); else through one `Page`.
use vramfit::model::Setup;
use vramfit::sweep::{self, Axis};

fn sweep_values(s: &Setup, axis: Axis) -> Vec<u64> {
    match axis {
        Axis::BatchSize => sweep::powers_of_two(1, s.train.batch_size.saturating_mul(4).max(64)),
        Axis::BlockSize => {
            let mut v = sweep::powers_of_two(64, s.model.block_size.saturating_mul(4).max(4096));
            if !v.contains(&s.model.block_size) {
                v.push(s.model.block_size);
                v.sort_unstable();
            }
            v.retain(|&b| b <= axis.limit(s));
            v
        }
    }
}

fn sweep_points(s: &Setup, axis: Axis) -> Result<Vec<sweep::Point>, vramfit::Error> {
    let mut values = sweep_values(s, axis);
    if axis == Axis::BatchSize && !values.contains(&s.train.batch_size) {
        values.push(s.train.batch_size);
        values.sort_unstable();
    }
    sweep::sweep(s, axis, &values)
}

/// As `www/main.js`: the estimate, then the advice and the plots up to the first that fails.
fn redraw(s: &Setup) -> u64 {
    let r = vramfit::estimate(s).unwrap();
    let c = vramfit::advice::compile_comparison(s, &r).unwrap();
    let rest = || -> Result<u64, vramfit::Error> {
        let sug = vramfit::advice::suggestions(s)?;
        let l = vramfit::advice::largest_that_fit(s)?;
        let a = sweep_points(s, Axis::BatchSize)?;
        let b = sweep_points(s, Axis::BlockSize)?;
        let mut blocks = sweep::powers_of_two(64, s.model.block_size.saturating_mul(4).max(4096));
        blocks.retain(|&b| b <= Axis::BlockSize.limit(s));
        let batches = sweep::powers_of_two(1, s.train.batch_size.saturating_mul(4).max(64));
        let budget = if s.device.memory_bytes > 0 {
            s.device.memory_bytes
        } else {
            u64::MAX
        };
        let m = sweep::fit_map(s, &batches, &blocks, budget)?;
        let t = vramfit::estimate(s)?;
        Ok(sug.len() as u64
            + l.0.unwrap_or(0)
            + a.len() as u64
            + b.len() as u64
            + m.fits.len() as u64
            + t.timeline.len() as u64)
    };
    r.peak_allocated_bytes + c.map_or(0, |c| c.eager_peak_bytes) + rest().unwrap_or(0)
}

fn redraw_page(s: &Setup) -> u64 {
    let mut p = vramfit::page::Page::new(s.clone());
    let r = p.estimate().unwrap();
    let c = p.compile_comparison(&r).unwrap();
    let mut rest = || -> Result<u64, vramfit::Error> {
        let sug = p.suggestions()?;
        let l = p.largest_that_fit()?;
        let a = p.sweep(Axis::BatchSize)?;
        let b = p.sweep(Axis::BlockSize)?;
        let m = p.fit_map()?;
        let t = p.estimate()?;
        Ok(sug.len() as u64
            + l.0.unwrap_or(0)
            + a.len() as u64
            + b.len() as u64
            + m.fits.len() as u64
            + t.timeline.len() as u64)
    };
    r.peak_allocated_bytes + c.map_or(0, |c| c.eager_peak_bytes) + rest().unwrap_or(0)
}

fn main() {
    let plain = std::env::var("PLAIN").is_ok();
    let mut args = std::env::args().skip(1);
    let id = args.next().unwrap_or_else(|| "founding".into());
    let n: u32 = args.next().map_or(1, |n| n.parse().expect("a count"));
    let s = if id == "founding" {
        vramfit::presets::founding()
    } else {
        vramfit::presets::model_preset(&id).expect("a preset id")
    };
    let mut last = 0;
    for _ in 0..n {
        let s = std::hint::black_box(&s);
        last = std::hint::black_box(if plain { redraw(s) } else { redraw_page(s) });
    }
    println!("{last}");
}
