//! Plots drawn with plotters on any `DrawingBackend`: a canvas in the browser, SVG in tests. The data comes
//! from `sweep` (points, bands, the fit map) and `report` (the timeline); nothing here estimates, and neither of
//! them knows this module.

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::gpus::{Plan, Way, PLOTTED_GPUS};
use crate::report::Stage;
use crate::sweep::{bands, Axis, FitMap, Point};

/// Colours of one theme.
#[derive(Debug, Clone, Copy)]
pub struct Theme {
    pub background: RGBColor,
    pub text: RGBColor,
    pub grid: RGBColor,
    pub capacity: RGBColor,
    pub fits: RGBColor,
    pub over: RGBColor,
    /// weights (incl. autocast copies), grads, optimizer, activations, logits, temporary (incl. workspace).
    pub components: [RGBColor; 6],
}

pub const LIGHT: Theme = Theme {
    background: RGBColor(255, 255, 255),
    text: RGBColor(30, 30, 36),
    grid: RGBColor(222, 222, 230),
    capacity: RGBColor(200, 30, 45),
    fits: RGBColor(46, 160, 90),
    over: RGBColor(214, 60, 70),
    components: [
        RGBColor(66, 110, 200),
        RGBColor(120, 90, 190),
        RGBColor(230, 150, 40),
        RGBColor(40, 160, 150),
        RGBColor(220, 80, 120),
        RGBColor(150, 150, 160),
    ],
};

pub const DARK: Theme = Theme {
    background: RGBColor(24, 26, 32),
    text: RGBColor(226, 228, 235),
    grid: RGBColor(58, 62, 74),
    capacity: RGBColor(255, 95, 100),
    fits: RGBColor(70, 190, 120),
    over: RGBColor(230, 80, 90),
    components: [
        RGBColor(110, 150, 240),
        RGBColor(165, 135, 235),
        RGBColor(245, 175, 70),
        RGBColor(70, 200, 185),
        RGBColor(240, 110, 150),
        RGBColor(150, 152, 165),
    ],
};

/// The legend's names of the six bands (`sweep::bands`), in their order.
pub const COMPONENT_NAMES: [&str; 6] = [
    "weights",
    "grads",
    "optimizer",
    "activations",
    "logits",
    "temporary",
];

const GIB: f64 = (1u64 << 30) as f64;

/// Pixels for a length given in CSS pixels, on a canvas `scale` times denser (the device pixel ratio).
fn px_at(scale: f64, v: f64) -> u32 {
    (v * scale).round() as u32
}

/// The plots' text style at `size` CSS pixels.
fn font_at(theme: &Theme, scale: f64, size: f64) -> TextStyle<'static> {
    (FontFamily::SansSerif, size * scale)
        .into_font()
        .color(&theme.text)
}

fn gib(b: u64) -> f64 {
    b as f64 / GIB
}

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("plot: {e:?}")
}

/// Memory against batch or block size: stacked bands by component at each point's peak, the device's capacity
/// as a line with the region above it shaded, and the current value marked. `scale` is the device pixel ratio
/// (fonts and strokes grow with it).
///
/// # Errors
/// A backend error, as text.
pub fn draw_sweep<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    axis: Axis,
    points: &[Point],
    capacity_bytes: Option<u64>,
    current: u64,
    theme: &Theme,
    scale: f64,
) -> Result<(), String> {
    root.fill(&theme.background).map_err(err)?;
    if points.is_empty() {
        return Ok(());
    }
    let px = |v: f64| px_at(scale, v);
    let font = |size: f64| font_at(theme, scale, size);
    // The x axis is log2 of the value, so that ticks fall on powers of two (the sizes people try).
    let lx = |v: u64| (v.max(1) as f64).log2();
    let x0 = lx(points.first().map_or(1, |p| p.value));
    let x1 = lx(points.last().map_or(2, |p| p.value)).max(x0 + 1.0);
    let top = points
        .iter()
        .map(|p| gib(p.peak_allocated_bytes))
        .fold(0.0, f64::max);
    let cap = capacity_bytes.map(gib);
    let ymax = (top.max(cap.unwrap_or(0.0)) * 1.12).max(0.5);
    let mut chart = ChartBuilder::on(root)
        .margin(px(10.0))
        .margin_right(px(24.0))
        .x_label_area_size(px(40.0))
        .y_label_area_size(px(52.0))
        .build_cartesian_2d(x0..x1, 0.0..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(axis.name())
        .y_desc("GiB (peak allocated)")
        .axis_desc_style(font(13.0))
        .label_style(font(12.0))
        .light_line_style(theme.grid.mix(0.3))
        .bold_line_style(theme.grid)
        .axis_style(theme.text)
        .x_labels((x1 - x0).round() as usize + 1)
        .x_label_formatter(&|v| format!("{}", 2f64.powf(*v).round() as u64))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .draw()
        .map_err(err)?;
    if let Some(cap) = cap {
        if cap < ymax {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0, cap), (x1, ymax)],
                    theme.over.mix(0.12).filled(),
                )))
                .map_err(err)?;
        }
    }
    // Bands, drawn from the top of the stack down so that each lower band covers the one above it.
    let cumulative: Vec<[f64; 6]> = points
        .iter()
        .map(|p| {
            let b = bands(&p.components);
            let mut acc = [0.0; 6];
            let mut sum = 0.0;
            for (i, v) in b.iter().enumerate() {
                sum += gib(*v);
                acc[i] = sum;
            }
            acc
        })
        .collect();
    for band in (0..6).rev() {
        let color = theme.components[band];
        chart
            .draw_series(AreaSeries::new(
                points
                    .iter()
                    .zip(&cumulative)
                    .map(|(p, c)| (lx(p.value), c[band])),
                0.0,
                color.mix(0.85),
            ))
            .map_err(err)?;
    }
    if let Some(cap) = cap {
        chart
            .draw_series(LineSeries::new(
                [(x0, cap), (x1, cap)],
                theme.capacity.stroke_width(px(2.0)),
            ))
            .map_err(err)?
            .label("GPU memory")
            .legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 12, y)], theme.capacity.stroke_width(2))
            });
    }
    if let Some(p) = points.iter().find(|p| p.value == current) {
        let y = gib(p.peak_allocated_bytes);
        chart
            .draw_series(std::iter::once(Circle::new(
                (lx(current), y),
                px(5.0),
                theme.text.filled(),
            )))
            .map_err(err)?;
    }
    draw_legend(
        chart.plotting_area().strip_coord_spec(),
        cap.is_some(),
        theme,
        scale,
    )?;
    root.present().map_err(err)
}

/// A one-row legend in the plot's top-left corner, laid out on a fixed grid: plotters' own series labels
/// measure text through the DOM, which the page's Content-Security-Policy forbids.
fn draw_legend<DB: DrawingBackend>(
    area: DrawingArea<DB, Shift>,
    capacity: bool,
    theme: &Theme,
    scale: f64,
) -> Result<(), String> {
    let mut items: Vec<(&str, RGBColor, bool)> = COMPONENT_NAMES
        .iter()
        .zip(theme.components)
        .map(|(name, color)| (*name, color, false))
        .collect();
    if capacity {
        items.push(("GPU memory", theme.capacity, true));
    }
    draw_legend_items(area, &items, theme, scale)
}

/// A legend of (label, colour, drawn as a line rather than a swatch) items in one row from the top-left.
fn draw_legend_items<DB: DrawingBackend>(
    area: DrawingArea<DB, Shift>,
    items: &[(&str, RGBColor, bool)],
    theme: &Theme,
    scale: f64,
) -> Result<(), String> {
    let s = |v: f64| (v * scale).round() as i32;
    let font = font_at(theme, scale, 11.0);
    let mut x = s(8.0);
    let y = s(8.0);
    for &(label, color, line) in items {
        if line {
            area.draw(&PathElement::new(
                [(x, y + s(5.0)), (x + s(12.0), y + s(5.0))],
                color.stroke_width(s(2.0) as u32),
            ))
            .map_err(err)?;
        } else {
            area.draw(&Rectangle::new(
                [(x, y), (x + s(10.0), y + s(10.0))],
                color.filled(),
            ))
            .map_err(err)?;
        }
        area.draw(&Text::new(
            label.to_string(),
            (x + s(15.0), y - s(1.0)),
            font.clone(),
        ))
        .map_err(err)?;
        x += s(22.0 + 6.2 * label.len() as f64);
    }
    Ok(())
}

/// The short names of `gpus::Way`s in the legend.
fn way_name(w: Way) -> &'static str {
    match w {
        Way::Ddp => "DDP",
        Way::Zero2 => "ZeRO-2",
        Way::Zero3 => "ZeRO-3",
        Way::Zero3Tp => "ZeRO-3 x TP",
        Way::Zero3Offload => "ZeRO-3 + offload",
    }
}

/// Memory per GPU (on the device) against the number of GPUs, one line per way (both axes in powers of two,
/// since the values span from a few GiB to the whole model's state), the setup on one GPU as a dot at 1, the
/// device's memory as a line, and `current` (GPUs, bytes) marked.
///
/// # Errors
/// A backend error, as text.
pub fn draw_gpus<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    plan: &Plan,
    current: Option<(u64, u64)>,
    theme: &Theme,
    scale: f64,
) -> Result<(), String> {
    root.fill(&theme.background).map_err(err)?;
    let values: Vec<u64> = plan
        .rows
        .iter()
        .flat_map(|r| r.points.iter().map(|p| p.1))
        .chain(plan.one_gpu_bytes)
        .chain((plan.budget_bytes > 0).then_some(plan.budget_bytes))
        .filter(|&b| b > 0)
        .collect();
    let (Some(&lo), Some(&hi)) = (values.iter().min(), values.iter().max()) else {
        return Ok(());
    };
    let px = |v: f64| px_at(scale, v);
    let font = |size: f64| font_at(theme, scale, size);
    let lx = |v: u64| (v.max(1) as f64).log2();
    // GiB on a log2 axis where the values span more than a factor of 8 (DDP's whole model beside ZeRO-3's
    // shards), else on a linear one from 0, whose ticks fall on round GiB.
    let log = gib(hi) > 8.0 * gib(lo);
    let ly = move |b: u64| {
        if log {
            gib(b.max(1)).log2()
        } else {
            gib(b)
        }
    };
    let (x0, x1) = (0.0, lx(PLOTTED_GPUS[PLOTTED_GPUS.len() - 1]));
    let (y0, y1) = if log {
        (ly(lo) - 0.3, ly(hi) + 0.3)
    } else {
        (0.0, (gib(hi) * 1.12).max(0.5))
    };
    let mut chart = ChartBuilder::on(root)
        .margin(px(10.0))
        .margin_top(px(28.0))
        .margin_right(px(24.0))
        .x_label_area_size(px(40.0))
        .y_label_area_size(px(52.0))
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("GPUs")
        .y_desc("GiB per GPU (on the device)")
        .axis_desc_style(font(13.0))
        .label_style(font(12.0))
        .light_line_style(theme.grid.mix(0.3))
        .bold_line_style(theme.grid)
        .axis_style(theme.text)
        .x_labels(PLOTTED_GPUS.len())
        .x_label_formatter(&|v| format!("{}", 2f64.powf(*v).round() as u64))
        .y_label_formatter(&|v| {
            let g = if log { 2f64.powf(*v) } else { *v };
            if g >= 10.0 {
                format!("{g:.0}")
            } else {
                format!("{g:.1}")
            }
        })
        .draw()
        .map_err(err)?;
    let cap = (plan.budget_bytes > 0).then(|| ly(plan.budget_bytes));
    if let Some(cap) = cap {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x0, cap), (x1, y1)],
                theme.over.mix(0.12).filled(),
            )))
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(
                [(x0, cap), (x1, cap)],
                theme.capacity.stroke_width(px(2.0)),
            ))
            .map_err(err)?;
    }
    let mut legend: Vec<(&str, RGBColor, bool)> = Vec::new();
    for (i, r) in plan.rows.iter().enumerate() {
        if r.points.is_empty() {
            continue;
        }
        let color = theme.components[i % theme.components.len()];
        let pts: Vec<(f64, f64)> = r.points.iter().map(|&(w, b)| (lx(w), ly(b))).collect();
        chart
            .draw_series(LineSeries::new(
                pts.iter().copied(),
                color.stroke_width(px(2.0)),
            ))
            .map_err(err)?;
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, px(3.0), color.filled())))
            .map_err(err)?;
        legend.push((way_name(r.way), color, true));
    }
    if let Some(one) = plan.one_gpu_bytes {
        chart
            .draw_series(std::iter::once(Circle::new(
                (0.0, ly(one)),
                px(5.0),
                theme.text.filled(),
            )))
            .map_err(err)?;
        legend.push(("one GPU", theme.text, false));
    }
    if let Some((w, b)) = current {
        chart
            .draw_series(std::iter::once(Circle::new(
                (lx(w), ly(b)),
                px(7.0),
                theme.text.stroke_width(px(2.0)),
            )))
            .map_err(err)?;
    }
    if cap.is_some() {
        legend.push(("GPU memory", theme.capacity, true));
    }
    draw_legend_items(root.clone(), &legend, theme, scale)?;
    root.present().map_err(err)
}

/// The fit map as a grid of cells (green fits, red does not), the current pair outlined.
///
/// # Errors
/// A backend error, as text.
pub fn draw_fit_map<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    map: &FitMap,
    current: (u64, u64),
    theme: &Theme,
    scale: f64,
) -> Result<(), String> {
    root.fill(&theme.background).map_err(err)?;
    let (nx, ny) = (map.batches.len(), map.blocks.len());
    if nx == 0 || ny == 0 {
        return Ok(());
    }
    let px = |v: f64| px_at(scale, v);
    let font = |size: f64| font_at(theme, scale, size);
    let mut chart = ChartBuilder::on(root)
        .margin(px(10.0))
        .margin_right(px(24.0))
        .x_label_area_size(px(40.0))
        .y_label_area_size(px(52.0))
        .build_cartesian_2d(0.0..nx as f64, 0.0..ny as f64)
        .map_err(err)?;
    let batches = map.batches.clone();
    let blocks = map.blocks.clone();
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("batch_size")
        .y_desc("block_size")
        .axis_desc_style(font(13.0))
        .label_style(font(12.0))
        .axis_style(theme.text)
        .x_labels(nx.min(12))
        .y_labels(ny.min(12))
        .x_label_formatter(&|v| {
            batches
                .get(v.floor() as usize)
                .map_or(String::new(), |b| b.to_string())
        })
        .y_label_formatter(&|v| {
            blocks
                .get(v.floor() as usize)
                .map_or(String::new(), |b| b.to_string())
        })
        .draw()
        .map_err(err)?;
    let cells = (0..ny).flat_map(|j| (0..nx).map(move |i| (i, j)));
    chart
        .draw_series(cells.map(|(i, j)| {
            let color = if map.fits[j][i] {
                theme.fits
            } else {
                theme.over
            };
            Rectangle::new(
                [(i as f64, j as f64), (i as f64 + 1.0, j as f64 + 1.0)],
                color.mix(0.75).filled(),
            )
        }))
        .map_err(err)?;
    if let (Some(i), Some(j)) = (
        map.batches.iter().position(|&b| b == current.0),
        map.blocks.iter().position(|&b| b == current.1),
    ) {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(i as f64, j as f64), (i as f64 + 1.0, j as f64 + 1.0)],
                theme.text.stroke_width(px(2.0)),
            )))
            .map_err(err)?;
    }
    root.present().map_err(err)
}

/// The memory timeline over the simulated steps: the highest live bytes in each stage, as steps.
///
/// # Errors
/// A backend error, as text.
pub fn draw_timeline<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    stages: &[Stage],
    grad_accum_steps: u64,
    capacity_bytes: Option<u64>,
    theme: &Theme,
    scale: f64,
) -> Result<(), String> {
    root.fill(&theme.background).map_err(err)?;
    if stages.is_empty() {
        return Ok(());
    }
    let px = |v: f64| px_at(scale, v);
    let font = |size: f64| font_at(theme, scale, size);
    let top = stages.iter().map(|s| gib(s.peak_bytes)).fold(0.0, f64::max);
    let ymax = (top.max(capacity_bytes.map(gib).unwrap_or(0.0)) * 1.12).max(0.5);
    let n = stages.len();
    let mut chart = ChartBuilder::on(root)
        .margin(px(10.0))
        .margin_right(px(24.0))
        .x_label_area_size(px(40.0))
        .y_label_area_size(px(52.0))
        .build_cartesian_2d(0.0..n as f64, 0.0..ymax)
        .map_err(err)?;
    let short = |stage: &str| {
        match stage {
            "forward" => "fwd",
            "loss backward" => "loss bwd",
            "backward" => "bwd",
            "optimizer" => "opt",
            other => other,
        }
        .to_string()
    };
    // "1.2-4 fwd": step 1, the micro-steps 2 to 4 (`report::micro_steps`).
    let labels: Vec<String> = stages
        .iter()
        .zip(crate::report::micro_steps(stages, grad_accum_steps))
        .map(|(s, m)| match m {
            Some(m) => format!("{}.{m} {}", s.step, short(s.stage)),
            None => format!("{} {}", s.step, short(s.stage)),
        })
        .collect();
    chart
        .configure_mesh()
        .x_desc("step, stage")
        .y_desc("GiB live (stage peak)")
        .axis_desc_style(font(13.0))
        .label_style(font(11.0))
        .light_line_style(theme.grid.mix(0.5))
        .bold_line_style(theme.grid)
        .axis_style(theme.text)
        .x_labels(n + 1)
        .x_label_formatter(&|v| labels.get(v.round() as usize).cloned().unwrap_or_default())
        .y_label_formatter(&|v| format!("{v:.1}"))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(stages.iter().enumerate().map(|(i, s)| {
            Rectangle::new(
                [(i as f64 + 0.1, 0.0), (i as f64 + 0.9, gib(s.peak_bytes))],
                theme.components[0].mix(0.8).filled(),
            )
        }))
        .map_err(err)?;
    if let Some(cap) = capacity_bytes.map(gib) {
        chart
            .draw_series(LineSeries::new(
                [(0.0, cap), (n as f64, cap)],
                theme.capacity.stroke_width(px(2.0)),
            ))
            .map_err(err)?;
    }
    root.present().map_err(err)
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::presets;
    use crate::sweep::{powers_of_two, sweep};

    fn svg(draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Result<(), String>) -> String {
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, (640, 360)).into_drawing_area();
            draw(&root).unwrap();
        }
        out
    }

    fn hex(c: RGBColor) -> String {
        format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
    }

    #[test]
    fn sweep_plot_has_bands_capacity_line_and_axis_names() {
        let s = presets::founding();
        let points = sweep(&s, Axis::BatchSize, &powers_of_two(1, 64)).unwrap();
        let out = svg(|root| {
            draw_sweep(
                root,
                Axis::BatchSize,
                &points,
                Some(12 << 30),
                16,
                &LIGHT,
                1.0,
            )
        });
        assert!(out.contains("batch_size"));
        assert!(out.contains("GPU memory"));
        assert!(out.contains(&hex(LIGHT.capacity)), "capacity line colour");
        for c in LIGHT.components {
            assert!(out.contains(&hex(c)), "band {c:?}");
        }
        // The current point (batch 16 of 1..64 on a log2 axis) sits two thirds of the way along the x axis.
        let circle = out.split("<circle").nth(1).expect("the current point");
        let cx: f64 = circle
            .split("cx=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let first_tick = 10.0 + 52.0; // margin + y label area
        let frac = (cx - first_tick) / (640.0 - 10.0 - first_tick);
        assert!(
            (frac - 4.0 / 6.0).abs() < 0.03,
            "current point at {frac} of the axis"
        );
    }

    #[test]
    fn fit_map_colours_cells_by_fit() {
        let map = FitMap {
            batches: vec![1, 2],
            blocks: vec![64, 128],
            fits: vec![vec![true, true], vec![true, false]],
        };
        let out = svg(|root| draw_fit_map(root, &map, (2, 128), &DARK, 1.0));
        assert!(out.contains(&hex(DARK.fits)) && out.contains(&hex(DARK.over)));
        assert!(out.contains("block_size"));
    }

    #[test]
    fn timeline_plot_draws_every_stage() {
        let r = crate::estimate(&presets::founding()).unwrap();
        let out = svg(|root| draw_timeline(root, &r.timeline, 1, Some(12 << 30), &LIGHT, 2.0));
        assert!(
            out.contains("2 loss bwd") && out.contains("3 opt"),
            "stage labels"
        );
        // The audit: under gradient accumulation each simulated micro-step's stages were labelled alike ("1 fwd"
        // twice); they are numbered, the last as the micro-steps it stands for.
        let mut s = presets::founding();
        s.train.grad_accum_steps = 4;
        let r = crate::estimate(&s).unwrap();
        let out = svg(|root| draw_timeline(root, &r.timeline, 4, Some(12 << 30), &LIGHT, 2.0));
        for label in ["1.1 fwd", "1.2-4 fwd", "2.2-4 loss bwd", "1 opt", "3 opt"] {
            assert!(out.contains(&format!("\n{label}\n")), "{label}");
        }
        assert!(!out.contains("\n1 fwd\n"));
    }

    /// The GPU plot: a line of the way's colour per modelled way with a dot per count, the one-GPU dot, the
    /// capacity line; a way without figures draws nothing and is left out of the legend.
    #[test]
    fn gpus_plot_draws_a_line_per_way() {
        let mut s = presets::model_preset("llama-3.2-1b").unwrap();
        s.device.memory_bytes = 12 << 30;
        let mut plan = crate::gpus::plan(&s).unwrap();
        plan.rows[4].points.clear();
        let out = svg(|root| {
            draw_gpus(
                root,
                &plan,
                Some((8, plan.rows[2].points[3].1)),
                &LIGHT,
                1.0,
            )
        });
        for (i, name) in ["DDP", "ZeRO-2", "ZeRO-3", "ZeRO-3 x TP"]
            .iter()
            .enumerate()
        {
            assert!(out.contains(name), "{name}");
            assert!(out.contains(&hex(LIGHT.components[i])), "{name}'s colour");
        }
        assert!(!out.contains("offload") && !out.contains(&hex(LIGHT.components[4])));
        assert!(
            out.contains("one GPU") && out.contains("GPU memory") && out.contains("GiB per GPU")
        );
        // A dot per plotted count on three lines and on the tensor-parallel one from its degree (8: 8, 16, 32,
        // 64), the one-GPU dot and the current point's ring.
        assert_eq!(plan.rows[3].points.len(), 4);
        assert_eq!(
            out.matches("<circle").count(),
            3 * PLOTTED_GPUS.len() + 4 + 2
        );
    }
}
