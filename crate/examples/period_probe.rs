//! How periodic the allocator's work is from one transformer block to the next (issue 12 item 5: an exact
//! extension of the timeline once the layers' pattern repeats needs that pattern to exist). For each model preset
//! on an H100-80 (as given, and with compile, checkpointing and expandable segments toggled), the run is recorded
//! (`simulate_recording`) and cut into windows, one per block of each forward and backward (a run of events with
//! one phase label). A window is compared with the window of the block before it in the same pass:
//!
//! - `ops`: the same Sim calls (op, bytes, in order) as the block before;
//! - `acts`: and the caching allocator did the same things (trace actions and sizes, in order);
//! - `moved`: and every traced address either stayed (a cached block reused in place) or moved by one amount
//!   Δ: the window is the one before it translated, as an extension by translation would produce it;
//! - `moved, p <= 24`: the window is so translated from the window 1, 2, ... or 24 blocks before it (a period of
//!   several blocks, such as the small pool's 2 MiB segments filling every few blocks).
//!
//! One line per setup, then the totals.
//!
//!     cargo run --release --example period_probe
use vramfit::allocator::TraceAction;
use vramfit::model::Setup;

/// Periods tried: a block's window against the one 1, 2, ..., `MAX_PERIOD` blocks before it.
const MAX_PERIOD: usize = 24;

#[derive(Default, Clone, Copy)]
struct Counts {
    windows: u64,
    ops: u64,
    acts: u64,
    moved: u64,
    moved_any: u64,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.windows += o.windows;
        self.ops += o.ops;
        self.acts += o.acts;
        self.moved += o.moved;
        self.moved_any += o.moved_any;
    }

    fn line(&self) -> String {
        let pct = |n: u64| 100.0 * n as f64 / self.windows.max(1) as f64;
        format!(
            "windows {:5}  ops {:5.1}%  acts {:5.1}%  moved {:5.1}%  moved, p <= {MAX_PERIOD} {:5.1}%",
            self.windows,
            pct(self.ops),
            pct(self.acts),
            pct(self.moved),
            pct(self.moved_any)
        )
    }
}

/// One block's window: its Sim calls and its trace entries.
#[derive(Default)]
struct Window {
    label: String,
    calls: Vec<(&'static str, i64)>,
    trace: Vec<(TraceAction, u64, u64)>,
}

fn is_block(label: &str) -> bool {
    label.contains("(block ")
}

fn windows(s: &Setup) -> Option<Vec<Window>> {
    let sim = vramfit::step::simulate_recording(s, true).ok()?;
    let events = sim.events();
    let trace = sim.allocator().trace();
    // Each event's window, by label runs.
    let mut out: Vec<Window> = Vec::new();
    let mut of_event = Vec::with_capacity(events.len());
    for e in events {
        if out.last().is_none_or(|w| w.label != e.phase) {
            out.push(Window {
                label: e.phase.clone(),
                ..Window::default()
            });
        }
        let w = out.len() - 1;
        out[w].calls.push((e.op, e.bytes));
        of_event.push(w);
    }
    // A trace entry belongs to the event of its caller id (the next one with that id and sign); segment
    // entries to the window of the next block entry.
    let (mut at, mut pending) = (0, Vec::new());
    for t in trace {
        let alloc = match t.action {
            TraceAction::Alloc => true,
            TraceAction::Free => false,
            _ => {
                pending.push((t.action, t.addr, t.size));
                continue;
            }
        };
        // Scratch is traced (alloc and free) before its two events; a block's own entries at its events.
        while at < events.len() && !(events[at].id == t.id && (events[at].bytes > 0) == alloc) {
            at += 1;
        }
        let e = at.min(events.len() - 1);
        let w = &mut out[of_event[e]];
        w.trace.append(&mut pending);
        w.trace.push((t.action, t.addr, t.size));
        if !alloc {
            at += 1;
        } else if at + 1 < events.len() && events[at + 1].id == t.id && events[at + 1].bytes < 0 {
            // Scratch: its free event follows at once and its Free entry follows in the trace.
        } else {
            at += 1;
        }
    }
    Some(out)
}

/// The stage of a label without its block ("step 2 forward").
fn stage(label: &str) -> &str {
    label.split(" (block").next().unwrap_or(label)
}

/// How window `b` compares with window `a`: (same calls, same acts, every address in place or moved by one Δ).
fn compare(a: &Window, b: &Window) -> (bool, bool, bool) {
    if a.calls != b.calls {
        return (false, false, false);
    }
    let acts = a.trace.len() == b.trace.len()
        && a.trace
            .iter()
            .zip(&b.trace)
            .all(|(x, y)| x.0 == y.0 && x.2 == y.2);
    if !acts {
        return (true, false, false);
    }
    let mut moves: Vec<i128> = a
        .trace
        .iter()
        .zip(&b.trace)
        .map(|(x, y)| i128::from(y.1) - i128::from(x.1))
        .collect();
    moves.sort_unstable();
    moves.dedup();
    (true, true, matches!(moves.as_slice(), [_] | [0, _]))
}

fn probe(s: &Setup) -> Option<Counts> {
    let ws = windows(s)?;
    let mut c = Counts::default();
    for (i, b) in ws.iter().enumerate() {
        if !is_block(&b.label) {
            continue;
        }
        c.windows += 1;
        // The window `p` blocks before, in the same pass (every window between is a block of it).
        let before = |p: usize| {
            let from = i.checked_sub(p)?;
            let same = |w: &Window| is_block(&w.label) && stage(&w.label) == stage(&b.label);
            ws[from..i].iter().all(same).then(|| &ws[from])
        };
        if let Some(a) = before(1) {
            let (ops, acts, moved) = compare(a, b);
            c.ops += u64::from(ops);
            c.acts += u64::from(acts);
            c.moved += u64::from(moved);
        }
        let any = (1..=MAX_PERIOD).any(|p| before(p).is_some_and(|a| compare(a, b).2));
        c.moved_any += u64::from(any);
    }
    Some(c)
}

fn main() {
    let mut total = Counts::default();
    for p in vramfit::presets::MODEL_PRESETS {
        for variant in ["", "compile", "checkpointing", "expandable"] {
            let mut s = (p.setup)();
            let g = vramfit::presets::gpu("h100-80").expect("a GPU preset");
            (s.device.memory_bytes, s.device.sm) = (g.memory_bytes, g.sm);
            match variant {
                "compile" => s.train.compile = !s.train.compile,
                "checkpointing" => s.train.checkpointing = !s.train.checkpointing,
                "expandable" => s.train.alloc_conf.expandable_segments = true,
                _ => {}
            }
            match probe(&s) {
                Some(c) => {
                    println!("{:16} {:13} {}", p.id, variant, c.line());
                    total.add(c);
                }
                None => println!("{:16} {:13} error", p.id, variant),
            }
        }
    }
    println!("{:30} {}", "all", total.line());
}
