//! `sentinel top`: a live table of the services, from the daemon's `stats` request once a
//! second, and a pane of the daemon's recent events (also those from before top started).
//!
//! Rates come from two samples. Exec/s and conn/s compare the kernel's counters a second apart;
//! CPU%, THR% and PSI% compare two of the daemon's background resource reads (every
//! `metrics.resource_refresh`, 10 s by default), so they change that often.

use std::{
    collections::HashMap,
    io::{self, IsTerminal},
    path::Path,
    time::{Duration, Instant},
};

use ratatui::{
    Frame, Terminal,
    backend::{CrosstermBackend, TestBackend},
    buffer::Buffer,
    crossterm::{
        event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
        execute,
        terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
    },
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Cell, Paragraph, Row, Table},
};

use crate::{
    Error,
    control::{
        self,
        report::{ServiceStats, StatsReport},
    },
    recent::RecentEvent,
};

const REFRESH: Duration = Duration::from_secs(1);
/// How long `--once` waits for a second resource read: a second more than the default
/// `metrics.resource_refresh`.
const ONCE_WAIT: Duration = Duration::from_secs(11);
/// `--once` without a terminal prints a frame this size (and taller when there are more rows).
const DEFAULT_SIZE: (u16, u16) = (80, 24);
/// Width of the memory bar inside the MEMORY column.
const BAR: usize = 5;
/// The columns right of SERVICE with the gaps between all columns; SERVICE gets the rest.
const FIGURE_COLUMNS: u16 = 16 + 5 + 5 + 9 + 5 + 7 + 7 + 4 + 8;
const SERVICE_MIN: usize = 12;

/// The columns a person can sort by, with the key that picks each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortBy {
    Name,
    Memory,
    Cpu,
    Pids,
    Execs,
    Connects,
    OomKills,
}

impl SortBy {
    fn from_key(key: char) -> Option<Self> {
        Some(match key {
            'n' => Self::Name,
            'm' => Self::Memory,
            'c' => Self::Cpu,
            'p' => Self::Pids,
            'e' => Self::Execs,
            't' => Self::Connects,
            'o' => Self::OomKills,
            _ => return None,
        })
    }
}

/// Percentages between the last two resource reads.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct ResourceRates {
    cpu_percent: Option<f64>,
    throttled_percent: Option<f64>,
    memory_pressure_percent: Option<f64>,
}

/// One service's figures as shown: totals of the last sample, rates over the last interval.
#[derive(Debug, Clone, PartialEq)]
struct ServiceRow {
    stats: ServiceStats,
    resources: ResourceRates,
    execs_per_second: f64,
    connects_per_second: f64,
}

/// What is on the screen, apart from the terminal.
pub struct Screen {
    previous: Option<StatsReport>,
    rows: Vec<ServiceRow>,
    /// By service, kept from one resource read to the next.
    resource_rates: HashMap<String, ResourceRates>,
    /// The resource read the rates end at; `None` until two reads were seen.
    rates_read_at_ms: Option<u64>,
    events: Vec<RecentEvent>,
    sort: SortBy,
    filter: String,
    /// Typing a filter (after `/`), until Enter or Esc.
    editing: bool,
    /// The last failure to reach the daemon, shown until a request succeeds.
    problem: Option<String>,
}

impl Default for Screen {
    fn default() -> Self {
        Self {
            previous: None,
            rows: Vec::new(),
            resource_rates: HashMap::new(),
            rates_read_at_ms: None,
            events: Vec::new(),
            sort: SortBy::Memory,
            filter: String::new(),
            editing: false,
            problem: None,
        }
    }
}

/// What a key asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Quit,
}

impl Screen {
    /// Takes a new sample: counter rates against the previous one, resource rates when it
    /// brings a new resource read.
    pub fn update(&mut self, stats: StatsReport) {
        let previous = self.previous.take();
        let before = |service: &str| {
            previous
                .as_ref()
                .and_then(|p| p.services.iter().find(|s| s.service == service))
        };
        let per_second = |value: Option<f64>, then: Option<f64>, seconds: Option<f64>| {
            Some((value? - then?).max(0.0) / seconds?)
        };
        if let Some(seconds) = previous
            .as_ref()
            .and_then(|p| seconds_between(p.resources_read_at_ms?, stats.resources_read_at_ms?))
        {
            self.resource_rates = stats
                .services
                .iter()
                .map(|now| {
                    let then = before(&now.service);
                    let percent = |value: fn(&ServiceStats) -> Option<f64>| {
                        per_second(value(now), then.and_then(value), Some(seconds))
                            .map(|rate| rate * 100.0)
                    };
                    let rates = ResourceRates {
                        cpu_percent: percent(|s| s.cpu_usage_seconds),
                        throttled_percent: percent(|s| s.cpu_throttled_seconds),
                        memory_pressure_percent: percent(|s| s.memory_pressure_seconds),
                    };
                    (now.service.clone(), rates)
                })
                .collect();
            self.rates_read_at_ms = stats.resources_read_at_ms;
        }
        let seconds = previous
            .as_ref()
            .and_then(|p| seconds_between(p.sampled_at_ms, stats.sampled_at_ms));
        self.rows = stats
            .services
            .iter()
            .map(|now| {
                let then = before(&now.service);
                let count_rate = |value: fn(&ServiceStats) -> u64| {
                    per_second(
                        Some(value(now) as f64),
                        then.map(|then| value(then) as f64),
                        seconds,
                    )
                    .unwrap_or(0.0)
                };
                ServiceRow {
                    resources: self
                        .resource_rates
                        .get(&now.service)
                        .copied()
                        .unwrap_or_default(),
                    execs_per_second: count_rate(|s| s.execs),
                    connects_per_second: count_rate(|s| s.tcp_connects),
                    stats: now.clone(),
                }
            })
            .collect();
        self.events.clone_from(&stats.events);
        self.previous = Some(stats);
        self.problem = None;
    }

    pub fn failed(&mut self, problem: String) {
        self.problem = Some(problem);
    }

    pub fn key(&mut self, key: KeyCode) -> Action {
        if self.editing {
            match key {
                KeyCode::Enter => self.editing = false,
                KeyCode::Esc => {
                    self.editing = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) => self.filter.push(c),
                _ => {}
            }
            return Action::Continue;
        }
        match key {
            KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
            KeyCode::Char('/') => {
                self.editing = true;
                self.filter.clear();
            }
            KeyCode::Char(c) => {
                if let Some(sort) = SortBy::from_key(c) {
                    self.sort = sort;
                }
            }
            _ => {}
        }
        Action::Continue
    }

    /// The rows that pass the filter, in the chosen order (largest first; names A to Z).
    fn visible(&self) -> Vec<&ServiceRow> {
        let mut rows: Vec<&ServiceRow> = self
            .rows
            .iter()
            .filter(|row| row.stats.service.contains(self.filter.as_str()))
            .collect();
        let key = |row: &ServiceRow| -> f64 {
            match self.sort {
                SortBy::Name => 0.0,
                SortBy::Memory => row.stats.memory_bytes.unwrap_or(0) as f64,
                SortBy::Cpu => row.resources.cpu_percent.unwrap_or(0.0),
                SortBy::Pids => row.stats.pids.unwrap_or(0) as f64,
                SortBy::Execs => row.execs_per_second,
                SortBy::Connects => row.connects_per_second,
                SortBy::OomKills => row.stats.oom_kills as f64,
            }
        };
        rows.sort_by(|a, b| {
            key(b)
                .total_cmp(&key(a))
                .then_with(|| a.stats.service.cmp(&b.stats.service))
        });
        rows
    }

    pub fn draw(&self, frame: &mut Frame) {
        let area = frame.area();
        let events_height = (self.events.len() as u16 + 2).clamp(3, 7);
        let [table_area, events_area, help_area] = Layout::vertical([
            Constraint::Min(3),
            Constraint::Length(events_height),
            Constraint::Length(1),
        ])
        .areas(area);
        let headers: [(&str, SortBy); 9] = [
            ("SERVICE", SortBy::Name),
            ("MEMORY", SortBy::Memory),
            ("CPU%", SortBy::Cpu),
            ("THR%", SortBy::Cpu),
            ("PIDS", SortBy::Pids),
            ("PSI%", SortBy::Memory),
            ("EXEC/s", SortBy::Execs),
            ("CONN/s", SortBy::Connects),
            ("OOM", SortBy::OomKills),
        ];
        let header = Row::new(headers.iter().enumerate().map(|(index, (title, sort))| {
            // Only the first column of a sort key carries the marker.
            let first = headers.iter().position(|(_, s)| s == sort) == Some(index);
            if *sort == self.sort && first {
                Cell::from(format!("{title}▼"))
            } else {
                Cell::from(*title)
            }
        }))
        .style(Style::default().add_modifier(Modifier::BOLD | Modifier::REVERSED));
        let visible = self.visible();
        let service_width = usize::from(area.width.saturating_sub(FIGURE_COLUMNS)).max(SERVICE_MIN);
        let rows = visible.iter().map(|row| {
            let stats = &row.stats;
            Row::new([
                tail(&stats.service, service_width),
                memory_cell(stats.memory_bytes, stats.memory_max_bytes),
                percent(row.resources.cpu_percent),
                percent(row.resources.throttled_percent),
                match (stats.pids, stats.pids_max) {
                    (Some(pids), Some(max)) => format!("{pids}/{max}"),
                    (Some(pids), None) => pids.to_string(),
                    (None, _) => "-".into(),
                },
                percent(row.resources.memory_pressure_percent),
                format!("{:.1}", row.execs_per_second),
                format!("{:.1}", row.connects_per_second),
                stats.oom_kills.to_string(),
            ])
        });
        let title = match &self.problem {
            Some(problem) => format!(" sentinel top: {problem} "),
            None => format!(
                " sentinel top: {} of {} services{} ",
                visible.len(),
                self.rows.len(),
                if self.filter.is_empty() {
                    String::new()
                } else {
                    format!(", filter \"{}\"", self.filter)
                }
            ),
        };
        let table = Table::new(
            rows,
            [
                Constraint::Min(SERVICE_MIN as u16),
                Constraint::Length(16),
                Constraint::Length(5),
                Constraint::Length(5),
                Constraint::Length(9),
                Constraint::Length(5),
                Constraint::Length(7),
                Constraint::Length(7),
                Constraint::Length(4),
            ],
        )
        .header(header)
        .block(Block::default().borders(Borders::TOP).title(title));
        frame.render_widget(table, table_area);
        // Newest first.
        let events: Vec<Line> = self
            .events
            .iter()
            .rev()
            .take(usize::from(events_height.saturating_sub(2)))
            .map(|event| Line::from(event_line(event)))
            .collect();
        let events = if events.is_empty() {
            vec![Line::from("none since the daemon started")]
        } else {
            events
        };
        frame.render_widget(
            Paragraph::new(events).block(Block::default().borders(Borders::ALL).title(" events ")),
            events_area,
        );
        let help = if self.editing {
            format!("filter: {}█  (Enter keeps it, Esc clears it)", self.filter)
        } else {
            "q quit  / filter  sort: n name m mem c cpu p pids e exec t conn o oom".into()
        };
        frame.render_widget(Paragraph::new(help), help_area);
    }
}

/// Seconds from one sample time to a later one (milliseconds since the daemon started).
fn seconds_between(from_ms: u64, to_ms: u64) -> Option<f64> {
    (to_ms > from_ms).then(|| (to_ms - from_ms) as f64 / 1000.0)
}

/// `15:04:05 sigterm web.service`, with the detail when there is one; the time is UTC, as in
/// the audit log.
fn event_line(event: &RecentEvent) -> String {
    let clock = event.time.get(11..19).unwrap_or(&event.time);
    let mut line = format!("{clock} {} {}", event.kind, event.subject);
    if !event.detail.is_empty() {
        line.push_str(": ");
        line.push_str(&event.detail);
    }
    line
}

/// The end of a long service name, which names the unit (`…ice/nginx.service`).
fn tail(name: &str, width: usize) -> String {
    let length = name.chars().count();
    if length <= width {
        return name.to_owned();
    }
    let kept: String = name.chars().skip(length - width + 1).collect();
    format!("…{kept}")
}

/// `▇▇▇░░ 45M/64M`: the bar fills with memory over the limit; no limit, no bar.
fn memory_cell(used: Option<u64>, limit: Option<u64>) -> String {
    match (used, limit) {
        (Some(used), Some(limit)) if limit > 0 => {
            let filled = ((used as f64 / limit as f64) * BAR as f64).round() as usize;
            let filled = filled.min(BAR);
            format!(
                "{}{} {}/{}",
                "▇".repeat(filled),
                "░".repeat(BAR - filled),
                bytes(used),
                bytes(limit)
            )
        }
        (Some(used), _) => bytes(used),
        (None, _) => "-".into(),
    }
}

fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |value| format!("{value:.1}"))
}

/// Short sizes: `512K`, `45M`, `1.5G`.
fn bytes(value: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
    for (size, unit) in UNITS {
        if value >= size {
            let scaled = value as f64 / size as f64;
            return if scaled < 10.0 && !value.is_multiple_of(size) {
                format!("{scaled:.1}{unit}")
            } else {
                format!("{}{unit}", value / size)
            };
        }
    }
    format!("{value}B")
}

/// `sentinel top --once`: samples a second apart until the daemon's next resource read (at
/// most [`ONCE_WAIT`]), so that CPU% has two reads to compare; one frame as text.
pub fn once(socket: &Path) -> Result<String, Error> {
    let mut screen = Screen::default();
    screen.update(control::stats(socket)?);
    let waited = Instant::now();
    loop {
        std::thread::sleep(REFRESH);
        screen.update(control::stats(socket)?);
        if screen.rates_read_at_ms.is_some() || waited.elapsed() >= ONCE_WAIT {
            break;
        }
    }
    // A terminal's own size; piped into a script, a fixed one, so that the output is stable.
    let (width, height) = if io::stdout().is_terminal() {
        terminal::size().unwrap_or(DEFAULT_SIZE)
    } else {
        DEFAULT_SIZE
    };
    // Every row fits: a script wants them all.
    let height = height.max(screen.rows.len() as u16 + 12);
    Ok(render_text(&screen, width, height))
}

/// The frame as lines of text, trailing spaces trimmed.
pub fn render_text(screen: &Screen, width: u16, height: u16) -> String {
    let mut terminal =
        Terminal::new(TestBackend::new(width, height)).expect("a test backend cannot fail");
    terminal
        .draw(|frame| screen.draw(frame))
        .expect("a test backend cannot fail");
    buffer_text(terminal.backend().buffer())
}

fn buffer_text(buffer: &Buffer) -> String {
    let width = usize::from(buffer.area.width);
    let lines: Vec<String> = buffer
        .content
        .chunks(width.max(1))
        .map(|line| {
            line.iter()
                .map(|cell| cell.symbol())
                .collect::<String>()
                .trim_end()
                .to_owned()
        })
        .collect();
    lines.join("\n").trim_end().to_owned()
}

/// Puts the terminal back however `run` ends.
struct RawMode;

impl RawMode {
    fn enter() -> io::Result<Self> {
        terminal::enable_raw_mode()?;
        let entered = Self;
        execute!(io::stdout(), EnterAlternateScreen)?;
        Ok(entered)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = execute!(io::stdout(), LeaveAlternateScreen);
        let _ = terminal::disable_raw_mode();
    }
}

/// The live dashboard, until `q`. A daemon that stops answering is shown, not fatal; one that
/// cannot be reached at the start is an error.
pub fn run(socket: &Path) -> Result<(), Error> {
    let mut screen = Screen::default();
    screen.update(control::stats(socket)?);
    let _raw = RawMode::enter()?;
    let mut terminal = Terminal::new(CrosstermBackend::new(io::stdout()))?;
    terminal.clear()?;
    let mut next = Instant::now() + REFRESH;
    loop {
        terminal.draw(|frame| screen.draw(frame))?;
        let wait = next.saturating_duration_since(Instant::now());
        if event::poll(wait)? {
            if let Event::Key(key) = event::read()?
                && key.kind == KeyEventKind::Press
            {
                let interrupt =
                    key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c');
                if interrupt || screen.key(key.code) == Action::Quit {
                    return Ok(());
                }
            }
            continue;
        }
        match control::stats(socket) {
            Ok(stats) => screen.update(stats),
            Err(error) => screen.failed(error.to_string()),
        }
        next = Instant::now() + REFRESH;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, memory_mib: u64, cpu_seconds: f64, execs: u64) -> ServiceStats {
        ServiceStats {
            service: name.into(),
            policy: Some("web".into()),
            memory_bytes: Some(memory_mib << 20),
            memory_max_bytes: Some(64 << 20),
            cpu_usage_seconds: Some(cpu_seconds),
            cpu_throttled_seconds: Some(0.0),
            pids: Some(3),
            pids_max: Some(32),
            memory_pressure_seconds: Some(0.0),
            cpu_pressure_seconds: Some(0.0),
            execs,
            tcp_connects: 0,
            oom_kills: 0,
        }
    }

    fn event(time: &str, kind: &str, subject: &str, detail: &str) -> RecentEvent {
        RecentEvent {
            time: time.into(),
            kind: kind.into(),
            subject: subject.into(),
            detail: detail.into(),
        }
    }

    /// The daemon's events: a ban made before top started, then an OOM kill.
    fn events() -> Vec<RecentEvent> {
        vec![
            event(
                "2026-11-21T15:04:05.123Z",
                "ban",
                "203.0.113.0/24",
                "operator",
            ),
            event("2026-11-21T15:04:07.000Z", "oom_kill", "small.service", ""),
        ]
    }

    /// Both services at `at_ms`, with the resource read of `read_at_ms`, and every event.
    fn sample(at_ms: u64, read_at_ms: u64, small: ServiceStats, big_cpu: f64) -> StatsReport {
        StatsReport {
            sampled_at_ms: at_ms,
            resources_read_at_ms: Some(read_at_ms),
            services: vec![small, service("big.service", 48, big_cpu, 0)],
            events: events(),
        }
    }

    /// small.service after its OOM kill.
    fn killed_once(cpu_seconds: f64, execs: u64) -> ServiceStats {
        ServiceStats {
            oom_kills: 1,
            ..service("small.service", 8, cpu_seconds, execs)
        }
    }

    /// Two samples two seconds apart, each with a new resource read.
    fn screen() -> Screen {
        let mut screen = Screen::default();
        let mut first = sample(1000, 1000, service("small.service", 8, 1.0, 10), 5.0);
        first.events.truncate(1);
        screen.update(first);
        screen.update(sample(3000, 3000, killed_once(1.5, 30), 5.2));
        screen
    }

    #[test]
    fn rates_come_from_two_samples_and_events_from_the_daemon() {
        let screen = screen();
        let small = &screen.visible()[1];
        assert_eq!(small.stats.service, "small.service");
        assert_eq!(small.resources.cpu_percent, Some(25.0));
        assert_eq!(small.execs_per_second, 10.0);
        assert_eq!(screen.events, events());
    }

    #[test]
    fn resource_rates_stay_until_the_next_resource_read() {
        let mut screen = screen();
        // A second later the counters moved, but the resource figures are the same read.
        screen.update(sample(4000, 3000, killed_once(1.5, 40), 5.2));
        let small = &screen.visible()[1];
        assert_eq!(small.resources.cpu_percent, Some(25.0));
        assert_eq!(small.execs_per_second, 10.0);
        assert_eq!(screen.rates_read_at_ms, Some(3000));
        // The next read, 10 s after the last: 2 s of CPU in it.
        screen.update(sample(5000, 13_000, killed_once(3.5, 40), 5.2));
        assert_eq!(screen.visible()[1].resources.cpu_percent, Some(20.0));
        assert_eq!(screen.visible()[1].execs_per_second, 0.0);
    }

    #[test]
    fn an_80_by_24_frame_shows_every_column_and_the_keys() {
        let text = render_text(&screen(), 80, 24);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1],
            "SERVICE        MEMORY▼          CPU%  THR%  PIDS      PSI%  EXEC/s  CONN/s  OOM"
        );
        assert_eq!(
            lines[2],
            "big.service    ▇▇▇▇░ 48M/64M    10.0  0.0   3/32      0.0   0.0     0.0     0"
        );
        assert_eq!(
            lines[3],
            "small.service  ▇░░░░ 8M/64M     25.0  0.0   3/32      0.0   10.0    0.0     1"
        );
        // Newest first.
        let events: Vec<&str> = lines
            .iter()
            .filter_map(|line| line.strip_prefix("│15:"))
            .map(|line| line.trim_end_matches(['│', ' ']))
            .collect();
        assert_eq!(
            events,
            [
                "04:07 oom_kill small.service",
                "04:05 ban 203.0.113.0/24: operator"
            ],
            "{text}"
        );
        assert_eq!(
            *lines.last().unwrap(),
            "q quit  / filter  sort: n name m mem c cpu p pids e exec t conn o oom"
        );
        assert!(lines.iter().all(|line| line.chars().count() <= 80));
    }

    #[test]
    fn keys_sort_filter_and_quit() {
        let mut screen = screen();
        assert_eq!(screen.key(KeyCode::Char('c')), Action::Continue);
        let names = |screen: &Screen| -> Vec<String> {
            screen
                .visible()
                .iter()
                .map(|row| row.stats.service.clone())
                .collect()
        };
        assert_eq!(names(&screen), ["small.service", "big.service"]);
        for key in ['/', 'b', 'i', 'g'] {
            screen.key(KeyCode::Char(key));
        }
        screen.key(KeyCode::Enter);
        assert_eq!(names(&screen), ["big.service"]);
        // While typing, `q` is part of the filter; afterwards it quits.
        screen.key(KeyCode::Char('/'));
        assert_eq!(screen.key(KeyCode::Char('q')), Action::Continue);
        screen.key(KeyCode::Esc);
        assert_eq!(names(&screen).len(), 2);
        assert_eq!(screen.key(KeyCode::Char('q')), Action::Quit);
    }

    #[test]
    fn sizes_are_short() {
        assert_eq!(tail("system.slice/nginx.service", 16), "…e/nginx.service");
        assert_eq!(tail("web", 16), "web");
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(1536 << 10), "1.5M");
        assert_eq!(bytes(64 << 20), "64M");
        assert_eq!(bytes(3 << 30), "3G");
        assert_eq!(memory_cell(Some(80 << 20), Some(64 << 20)), "▇▇▇▇▇ 80M/64M");
        assert_eq!(memory_cell(Some(1 << 20), None), "1M");
        assert_eq!(memory_cell(None, None), "-");
    }
}
