//! `sentinel top`: a live table of the services, from the daemon's `stats` request once a
//! second. Rates come from two samples; the events pane lists what changed between samples
//! (OOM kills, bans made and lifted) while it runs.

use std::{
    collections::{BTreeSet, VecDeque},
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
};

const REFRESH: Duration = Duration::from_secs(1);
/// Events kept for the pane; the oldest go first.
const MAX_EVENTS: usize = 50;
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

/// One service's figures as shown: totals of the last sample, rates over the last interval.
#[derive(Debug, Clone, PartialEq)]
struct ServiceRow {
    stats: ServiceStats,
    cpu_percent: Option<f64>,
    throttled_percent: Option<f64>,
    memory_pressure_percent: Option<f64>,
    execs_per_second: f64,
    connects_per_second: f64,
}

/// What is on the screen, apart from the terminal.
pub struct Screen {
    previous: Option<StatsReport>,
    rows: Vec<ServiceRow>,
    events: VecDeque<String>,
    bans: Option<BTreeSet<String>>,
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
            events: VecDeque::new(),
            bans: None,
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
    /// Takes a new sample: rates against the previous one, events for what changed.
    pub fn update(&mut self, stats: StatsReport, bans: Option<Vec<String>>) {
        let elapsed = self
            .previous
            .as_ref()
            .map(|previous| stats.sampled_at_ms.saturating_sub(previous.sampled_at_ms))
            .filter(|millis| *millis > 0)
            .map(|millis| millis as f64 / 1000.0);
        let previous = self.previous.take();
        let before = |service: &str| {
            previous
                .as_ref()
                .and_then(|p| p.services.iter().find(|s| s.service == service))
        };
        self.rows = stats
            .services
            .iter()
            .map(|now| {
                let then = before(&now.service);
                let rate = |value: &dyn Fn(&ServiceStats) -> Option<f64>| {
                    Some((value(now)? - value(then?)?).max(0.0) / elapsed?)
                };
                let count_rate = |value: fn(&ServiceStats) -> u64| {
                    rate(&|s| Some(value(s) as f64)).unwrap_or(0.0)
                };
                if let Some(then) = then
                    && now.oom_kills > then.oom_kills
                {
                    self.events.push_back(format!(
                        "OOM kill in {} ({} total)",
                        now.service, now.oom_kills
                    ));
                }
                ServiceRow {
                    cpu_percent: rate(&|s| s.cpu_usage_seconds).map(|r| r * 100.0),
                    throttled_percent: rate(&|s| s.cpu_throttled_seconds).map(|r| r * 100.0),
                    memory_pressure_percent: rate(&|s| s.memory_pressure_seconds)
                        .map(|r| r * 100.0),
                    execs_per_second: count_rate(|s| s.execs),
                    connects_per_second: count_rate(|s| s.tcp_connects),
                    stats: now.clone(),
                }
            })
            .collect();
        if let Some(bans) = bans {
            let bans: BTreeSet<String> = bans.into_iter().collect();
            if let Some(before) = &self.bans {
                for added in bans.difference(before) {
                    self.events.push_back(format!("banned {added}"));
                }
                for lifted in before.difference(&bans) {
                    self.events.push_back(format!("ban of {lifted} ended"));
                }
            }
            self.bans = Some(bans);
        }
        while self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
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
                SortBy::Cpu => row.cpu_percent.unwrap_or(0.0),
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
                percent(row.cpu_percent),
                percent(row.throttled_percent),
                match (stats.pids, stats.pids_max) {
                    (Some(pids), Some(max)) => format!("{pids}/{max}"),
                    (Some(pids), None) => pids.to_string(),
                    (None, _) => "-".into(),
                },
                percent(row.memory_pressure_percent),
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
        let events: Vec<Line> = self
            .events
            .iter()
            .rev()
            .take(usize::from(events_height.saturating_sub(2)))
            .map(|event| Line::from(event.as_str()))
            .collect();
        let events = if events.is_empty() {
            vec![Line::from("none since top started")]
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

/// One sample of everything the screen shows.
fn sample(socket: &Path) -> Result<(StatsReport, Option<Vec<String>>), Error> {
    let stats = control::stats(socket)?;
    // Without an SSH guard there are no bans to follow; the table still works.
    let bans = control::ban_list(socket)
        .ok()
        .map(|bans| bans.into_iter().map(|ban| ban.address).collect());
    Ok((stats, bans))
}

/// `sentinel top --once`: two samples a second apart, one frame as text.
pub fn once(socket: &Path) -> Result<String, Error> {
    let mut screen = Screen::default();
    let (stats, bans) = sample(socket)?;
    screen.update(stats, bans);
    std::thread::sleep(REFRESH);
    let (stats, bans) = sample(socket)?;
    screen.update(stats, bans);
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
    let (stats, bans) = sample(socket)?;
    screen.update(stats, bans);
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
        match sample(socket) {
            Ok((stats, bans)) => screen.update(stats, bans),
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

    fn screen() -> Screen {
        let mut screen = Screen::default();
        screen.update(
            StatsReport {
                sampled_at_ms: 1000,
                services: vec![
                    service("small.service", 8, 1.0, 10),
                    service("big.service", 48, 5.0, 0),
                ],
            },
            Some(Vec::new()),
        );
        let mut busy = service("small.service", 8, 1.5, 30);
        busy.oom_kills = 1;
        screen.update(
            StatsReport {
                sampled_at_ms: 3000,
                services: vec![busy, service("big.service", 48, 5.2, 0)],
            },
            Some(vec!["203.0.113.0/24".into()]),
        );
        screen
    }

    #[test]
    fn rates_come_from_two_samples_and_changes_become_events() {
        let screen = screen();
        let small = &screen.visible()[1];
        assert_eq!(small.stats.service, "small.service");
        assert_eq!(small.cpu_percent, Some(25.0));
        assert_eq!(small.execs_per_second, 10.0);
        assert_eq!(
            screen.events,
            [
                "OOM kill in small.service (1 total)",
                "banned 203.0.113.0/24"
            ]
        );
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
        assert!(text.contains("│banned 203.0.113.0/24"), "{text}");
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
