//! What the generator sends: how many platforms, gateways and users, the message sizes and
//! the lane mix, and the rate over time (the profile).

use crate::accounting::LaneKind;
use rand::Rng;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The smallest payload: the first 8 bytes carry the due time, the next 8 the sequence number.
pub const MIN_PAYLOAD: usize = 16;

/// A workload specification that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

/// Payload sizes.
#[derive(Debug, Clone, PartialEq)]
pub enum SizeDist {
    /// Every payload this size.
    Fixed(usize),
    /// Uniform between the two bounds, inclusive.
    Uniform(usize, usize),
    /// Sizes with weights.
    Weighted(Vec<(usize, u32)>),
}

impl SizeDist {
    /// Draws one size (at least [`MIN_PAYLOAD`]).
    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let size = match self {
            SizeDist::Fixed(n) => *n,
            SizeDist::Uniform(lo, hi) => rng.gen_range(*lo..=*hi),
            SizeDist::Weighted(choices) => {
                let total: u32 = choices.iter().map(|(_, w)| w).sum();
                let mut pick = rng.gen_range(0..total.max(1));
                let mut size = choices.first().map_or(MIN_PAYLOAD, |c| c.0);
                for (s, w) in choices {
                    if pick < *w {
                        size = *s;
                        break;
                    }
                    pick -= w;
                }
                size
            }
        };
        size.max(MIN_PAYLOAD)
    }

    /// The mean size.
    pub fn mean(&self) -> f64 {
        match self {
            SizeDist::Fixed(n) => *n as f64,
            SizeDist::Uniform(lo, hi) => (*lo + *hi) as f64 / 2.0,
            SizeDist::Weighted(c) => {
                let total: u32 = c.iter().map(|(_, w)| w).sum();
                c.iter().map(|(s, w)| *s as f64 * *w as f64).sum::<f64>() / total.max(1) as f64
            }
        }
    }

    /// The largest size it can draw.
    pub fn max(&self) -> usize {
        match self {
            SizeDist::Fixed(n) => *n,
            SizeDist::Uniform(_, hi) => *hi,
            SizeDist::Weighted(c) => c.iter().map(|(s, _)| *s).max().unwrap_or(0),
        }
    }
}

impl FromStr for SizeDist {
    type Err = SpecError;

    /// `256`, `64-1024` (uniform), or `128:70,1024:25,16384:5` (size:weight).
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| SpecError(format!("size `{t}` is not a number of bytes")))
        };
        let dist = if s.contains(':') {
            let mut choices = Vec::new();
            for part in s.split(',') {
                let (size, weight) = part
                    .split_once(':')
                    .ok_or_else(|| SpecError(format!("`{part}`: expected SIZE:WEIGHT")))?;
                let weight = weight
                    .trim()
                    .parse::<u32>()
                    .map_err(|_| SpecError(format!("weight `{weight}` is not a number")))?;
                choices.push((num(size)?, weight));
            }
            if choices.iter().map(|c| c.1).sum::<u32>() == 0 {
                return Err(SpecError("size weights add up to 0".into()));
            }
            SizeDist::Weighted(choices)
        } else if let Some((lo, hi)) = s.split_once('-') {
            let (lo, hi) = (num(lo)?, num(hi)?);
            if lo > hi {
                return Err(SpecError(format!("size range {lo}-{hi} is empty")));
            }
            SizeDist::Uniform(lo, hi)
        } else {
            SizeDist::Fixed(num(s)?)
        };
        if dist.max() < MIN_PAYLOAD {
            return Err(SpecError(format!(
                "payloads need at least {MIN_PAYLOAD} bytes (due time and sequence number)"
            )));
        }
        Ok(dist)
    }
}

impl fmt::Display for SizeDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeDist::Fixed(n) => write!(f, "{n}"),
            SizeDist::Uniform(lo, hi) => write!(f, "{lo}-{hi}"),
            SizeDist::Weighted(c) => {
                let parts: Vec<String> = c.iter().map(|(s, w)| format!("{s}:{w}")).collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

/// Weights of the lanes, e.g. `call=5,chat=95`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneMix {
    /// Weight of call signalling.
    pub call: u32,
    /// Weight of chat.
    pub chat: u32,
}

impl LaneMix {
    /// Only chat.
    pub const CHAT: LaneMix = LaneMix { call: 0, chat: 1 };

    /// Draws a lane.
    pub fn pick(&self, rng: &mut impl Rng) -> LaneKind {
        if rng.gen_range(0..self.call + self.chat) < self.call {
            LaneKind::Call
        } else {
            LaneKind::Chat
        }
    }
}

impl FromStr for LaneMix {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let mut mix = LaneMix { call: 0, chat: 0 };
        for part in s.split(',') {
            let (lane, weight) = part
                .split_once('=')
                .ok_or_else(|| SpecError(format!("`{part}`: expected LANE=WEIGHT")))?;
            let weight = weight
                .trim()
                .parse::<u32>()
                .map_err(|_| SpecError(format!("weight `{weight}` is not a number")))?;
            match lane.trim() {
                "call" => mix.call = weight,
                "chat" => mix.chat = weight,
                "bulk" if weight == 0 => {}
                "bulk" => {
                    return Err(SpecError(
                        "the bulk lane carries campaigns only, not person-to-person messages; \
                         `stress bulk` runs a campaign"
                            .into(),
                    ));
                }
                other => return Err(SpecError(format!("unknown lane `{other}` (call, chat)"))),
            }
        }
        if mix.call + mix.chat == 0 {
            return Err(SpecError("the lane mix has no weight".into()));
        }
        Ok(mix)
    }
}

impl fmt::Display for LaneMix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "call={},chat={}", self.call, self.chat)
    }
}

/// Who sends and what.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Platforms taking part (each sends to the others).
    pub platforms: usize,
    /// Sessions per platform.
    pub gateways: usize,
    /// Users per platform.
    pub users: usize,
    /// Payload sizes.
    pub size: SizeDist,
    /// Lane weights.
    pub mix: LaneMix,
    /// Receive window each gateway asks for.
    pub window: u32,
    /// Closed loop: unanswered messages per gateway. Open loop: the SDK's limit.
    pub max_pending: usize,
    /// Platforms (indexes) that receive but never ack and never send.
    pub silent: Vec<usize>,
    /// Only these platforms send (empty: every platform that is not silent).
    pub sources: Vec<usize>,
    /// Seed of the generator's choices.
    pub seed: u64,
}

/// One piece of a rate profile: the rate moves linearly from `from` to `to`.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// How long.
    pub duration: Duration,
    /// Rate at the start, msgs/s.
    pub from: f64,
    /// Rate at the end, msgs/s.
    pub to: f64,
    /// Lane mix in force (else the workload's).
    pub mix: Option<LaneMix>,
    /// A name for reports (`baseline`, `ramp`, `burst`...).
    pub label: &'static str,
}

/// The offered rate over time (open loop).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Profile {
    /// In order.
    pub segments: Vec<Segment>,
}

/// How call signalling bursts during a surge's peak.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bursts {
    /// A burst starts this often during the peak.
    pub every: Duration,
    /// And lasts this long.
    pub length: Duration,
    /// Share of call signalling during a burst, in percent.
    pub call_percent: u32,
    /// Rate multiplier during a burst (on top of the peak).
    pub rate_factor: f64,
}

impl Profile {
    /// One rate for `duration`.
    pub fn constant(rate: f64, duration: Duration) -> Self {
        Self {
            segments: vec![Segment {
                duration,
                from: rate,
                to: rate,
                mix: None,
                label: "steady",
            }],
        }
    }

    /// A pilgrimage-season surge over `duration`: baseline (20 %), ramp up to
    /// `factor` × baseline (15 %), peak with call-signalling bursts (30 %), ramp down (15 %),
    /// baseline again (20 %).
    pub fn surge(baseline: f64, factor: f64, duration: Duration, bursts: Bursts) -> Self {
        let part = |share: f64| duration.mul_f64(share);
        let peak = baseline * factor;
        let mut segments = vec![
            Segment {
                duration: part(0.20),
                from: baseline,
                to: baseline,
                mix: None,
                label: "baseline",
            },
            Segment {
                duration: part(0.15),
                from: baseline,
                to: peak,
                mix: None,
                label: "ramp-up",
            },
        ];
        let peak_len = part(0.30);
        let burst_mix = LaneMix {
            call: bursts.call_percent,
            chat: 100u32.saturating_sub(bursts.call_percent),
        };
        let mut at = Duration::ZERO;
        while at < peak_len {
            let quiet = bursts
                .every
                .saturating_sub(bursts.length)
                .min(peak_len - at);
            if !quiet.is_zero() {
                segments.push(Segment {
                    duration: quiet,
                    from: peak,
                    to: peak,
                    mix: None,
                    label: "peak",
                });
                at += quiet;
            }
            let burst = bursts.length.min(peak_len.saturating_sub(at));
            if burst.is_zero() {
                break;
            }
            segments.push(Segment {
                duration: burst,
                from: peak * bursts.rate_factor,
                to: peak * bursts.rate_factor,
                mix: Some(burst_mix),
                label: "call-burst",
            });
            at += burst;
        }
        segments.push(Segment {
            duration: part(0.15),
            from: peak,
            to: baseline,
            mix: None,
            label: "ramp-down",
        });
        let used: Duration = segments.iter().map(|s| s.duration).sum();
        segments.push(Segment {
            duration: duration.saturating_sub(used),
            from: baseline,
            to: baseline,
            mix: None,
            label: "baseline",
        });
        Self { segments }
    }

    /// Total length.
    pub fn duration(&self) -> Duration {
        self.segments.iter().map(|s| s.duration).sum()
    }

    /// Messages the profile offers.
    pub fn expected_count(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| (s.from + s.to) / 2.0 * s.duration.as_secs_f64())
            .sum::<f64>()
            .round() as u64
    }

    /// Highest rate anywhere in the profile.
    pub fn peak_rate(&self) -> f64 {
        self.segments
            .iter()
            .map(|s| s.from.max(s.to))
            .fold(0.0, f64::max)
    }

    /// Every message slot, in order: its due time (ns after the phase start) and the lane
    /// mix in force. Computed in 1 ms steps; the slots of a step are spread evenly over it.
    pub fn slots(&self) -> Slots<'_> {
        Slots {
            profile: self,
            segment: 0,
            segment_start_ns: 0,
            t: 0,
            carry: 0.0,
            step: (0, 0, 0),
            step_total: 0,
        }
    }
}

/// The slots of a [`Profile`], generated as they are read.
#[derive(Debug, Clone)]
pub struct Slots<'a> {
    profile: &'a Profile,
    segment: usize,
    segment_start_ns: u64,
    /// Position in the segment, ns.
    t: u64,
    carry: f64,
    /// The step being emitted: (its start, its length, slots left).
    step: (u64, u64, u64),
    /// Slots in that step.
    step_total: u64,
}

const STEP_NS: u64 = 1_000_000;

impl Iterator for Slots<'_> {
    type Item = (u64, Option<LaneMix>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let seg = self.profile.segments.get(self.segment)?;
            let (start, len, left) = self.step;
            if left > 0 {
                // Emit the step's slots evenly: slot k of n at start + len*k/n.
                let n = self.step_total;
                let k = n - left;
                self.step.2 -= 1;
                return Some((self.segment_start_ns + start + len * k / n.max(1), seg.mix));
            }
            let seg_len = seg.duration.as_nanos() as u64;
            if self.t >= seg_len {
                self.segment += 1;
                self.segment_start_ns += seg_len;
                self.t = 0;
                continue;
            }
            let step = STEP_NS.min(seg_len - self.t);
            let mid = (self.t + step / 2) as f64 / seg_len.max(1) as f64;
            let rate = seg.from + (seg.to - seg.from) * mid;
            self.carry += rate * step as f64 / 1e9;
            let n = self.carry.floor();
            self.carry -= n;
            self.step = (self.t, step, n as u64);
            self.step_total = n as u64;
            self.t += step;
        }
    }
}

/// Parses `500ms`, `10s`, `5m`, `1h`, `1m30s`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, SpecError> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>()
        && secs >= 0.0
        && secs.is_finite()
    {
        return Ok(Duration::from_secs_f64(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err(SpecError("empty duration".into()));
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| SpecError(format!("`{s}`: missing unit (ms, s, m, h)")))?;
        if digits == 0 {
            return Err(SpecError(format!("`{s}` is not a duration")));
        }
        let value: f64 = rest[..digits]
            .parse()
            .map_err(|_| SpecError(format!("`{s}` is not a duration")))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            other => return Err(SpecError(format!("`{s}`: unknown unit `{other}`"))),
        };
        total += Duration::from_secs_f64(value * unit);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

impl Workload {
    /// Whether platform `p` sends.
    pub fn sends(&self, p: usize) -> bool {
        !self.silent.contains(&p) && (self.sources.is_empty() || self.sources.contains(&p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn sizes_parse_and_draw_in_range() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!("256".parse::<SizeDist>().unwrap(), SizeDist::Fixed(256));
        let u: SizeDist = "64-1024".parse().unwrap();
        for _ in 0..100 {
            let n = u.sample(&mut rng);
            assert!((64..=1024).contains(&n));
        }
        let w: SizeDist = "100:1,1000:0".parse().unwrap();
        assert_eq!(w.sample(&mut rng), 100);
        assert_eq!(w.to_string(), "100:1,1000:0");
        assert!("8".parse::<SizeDist>().is_err(), "too small for the stamp");
        assert!("x".parse::<SizeDist>().is_err());
        assert!("900-100".parse::<SizeDist>().is_err());
    }

    #[test]
    fn mix_parses_and_refuses_bulk() {
        let m: LaneMix = "call=5,chat=95".parse().unwrap();
        assert_eq!(m, LaneMix { call: 5, chat: 95 });
        assert!("bulk=10,chat=90".parse::<LaneMix>().is_err());
        assert!("call=0".parse::<LaneMix>().is_err());
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let calls = (0..10_000)
            .filter(|_| m.pick(&mut rng) == LaneKind::Call)
            .count();
        assert!((300..700).contains(&calls), "{calls}");
    }

    #[test]
    fn constant_profile_has_rate_times_duration_slots() {
        let p = Profile::constant(1000.0, Duration::from_secs(2));
        let slots: Vec<_> = p.slots().collect();
        assert_eq!(slots.len(), 2000);
        assert!(slots.windows(2).all(|w| w[0].0 <= w[1].0));
        assert!(slots.last().unwrap().0 < 2_000_000_000);
    }

    #[test]
    fn surge_ramps_to_the_factor_and_back() {
        let bursts = Bursts {
            every: Duration::from_secs(5),
            length: Duration::from_secs(1),
            call_percent: 50,
            rate_factor: 1.0,
        };
        let p = Profile::surge(100.0, 10.0, Duration::from_secs(60), bursts);
        assert_eq!(p.duration(), Duration::from_secs(60));
        assert_eq!(p.peak_rate(), 1000.0);
        assert!(p.segments.iter().any(|s| s.label == "call-burst"));
        let expected = p.expected_count() as i64;
        assert!((p.slots().count() as i64 - expected).abs() <= 2);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
    }
}
