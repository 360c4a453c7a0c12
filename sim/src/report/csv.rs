//! One run's rounds to and from CSV, so a later command can re-plot without re-simulating.
//!
//! The format is fixed and tiny (eleven numeric columns, the last empty when
//! the run spent no DP budget; no quoting), so plain `std::fmt`
//! and `str::split` do the job without a CSV crate. Floats are written with `{}`, which
//! prints the shortest text that parses back to the same `f64`, so a round trip is exact.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::str::FromStr;

use anyhow::{Context, bail};

use super::RoundRecord;

/// The header line, naming [`RoundRecord`]'s fields in the order each row lists them.
pub const CSV_HEADER: &str =
    "round,accuracy,loss,bytes_up,bytes_down,mean_kl,wall_s,train_samples,train_s,clock_s,epsilon";

/// The header before the epsilon column, still read back.
const CSV_HEADER_10: &str =
    "round,accuracy,loss,bytes_up,bytes_down,mean_kl,wall_s,train_samples,train_s,clock_s";

/// Number of columns in [`CSV_HEADER`], checked on every row read back.
const COLUMNS: usize = 11;

/// Writes `history`'s rounds to `path` as CSV, creating missing parent directories so
/// callers can name a fresh results folder directly.
pub fn write_csv(path: &Path, history: &super::RunHistory) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create directory {}", parent.display()))?;
    }
    fs::write(path, to_csv(&history.rounds))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Reads rounds written by [`write_csv`]; the run's label, strategy and seed are not in the
/// file, so the caller supplies them (typically from the file name).
pub fn read_csv(path: &Path) -> anyhow::Result<Vec<RoundRecord>> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_csv(&text).with_context(|| format!("in {}", path.display()))
}

/// Renders rounds as CSV text, header first, one line per round.
fn to_csv(rounds: &[RoundRecord]) -> String {
    let mut out = String::with_capacity(64 * (rounds.len() + 1));
    out.push_str(CSV_HEADER);
    out.push('\n');
    for r in rounds {
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{}",
            r.round,
            r.accuracy,
            r.loss,
            r.bytes_up,
            r.bytes_down,
            r.mean_kl,
            r.wall_s,
            r.train_samples,
            r.train_s,
            r.clock_s,
            r.epsilon.map(|e| e.to_string()).unwrap_or_default()
        );
    }
    out
}

/// Parses CSV text produced by [`to_csv`]; blank lines and `\r\n` endings are tolerated
/// because a file may have passed through an editor or another OS.
fn parse_csv(text: &str) -> anyhow::Result<Vec<RoundRecord>> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty());
    let columns = match lines.next() {
        Some((_, header)) if header == CSV_HEADER => COLUMNS,
        Some((_, header)) if header == CSV_HEADER_10 => COLUMNS - 1,
        Some((_, header)) => bail!("header is `{header}`, expected `{CSV_HEADER}`"),
        None => bail!("file is empty, expected the header `{CSV_HEADER}`"),
    };
    lines
        .map(|(number, line)| parse_row(line, columns).with_context(|| format!("line {number}")))
        .collect()
}

/// Parses one data row.
fn parse_row(line: &str, columns: usize) -> anyhow::Result<RoundRecord> {
    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
    if fields.len() != columns {
        bail!("row has {} columns, expected {columns}", fields.len());
    }
    Ok(RoundRecord {
        round: field(&fields, 0, "round")?,
        accuracy: field(&fields, 1, "accuracy")?,
        loss: field(&fields, 2, "loss")?,
        bytes_up: field(&fields, 3, "bytes_up")?,
        bytes_down: field(&fields, 4, "bytes_down")?,
        mean_kl: field(&fields, 5, "mean_kl")?,
        wall_s: field(&fields, 6, "wall_s")?,
        train_samples: field(&fields, 7, "train_samples")?,
        train_s: field(&fields, 8, "train_s")?,
        clock_s: field(&fields, 9, "clock_s")?,
        epsilon: match fields.get(10) {
            None | Some(&"") => None,
            Some(_) => Some(field(&fields, 10, "epsilon")?),
        },
        mediators: Vec::new(),
        hops: Default::default(),
    })
}

/// Parses column `index`, naming the column and the text when it is not a number.
fn field<T: FromStr>(fields: &[&str], index: usize, name: &str) -> anyhow::Result<T> {
    let text = fields[index];
    text.parse()
        .map_err(|_| anyhow::anyhow!("column {name} is `{text}`, not a number of its type"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::fixtures::run;

    /// A fresh, empty directory under the system temp dir, unique per test name.
    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("astraea-report-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn csv_round_trip_is_exact() {
        // Prepare: awkward floats (thirds, tiny and huge values) that a fixed precision
        // would round.
        let mut history = run(
            "fedavg seed 3",
            "fedavg",
            3,
            &[0.1, 1.0 / 3.0, 0.987_654_321],
        );
        history.rounds[1].loss = 1e-300;
        history.rounds[2].wall_s = 123_456_789.012_345;
        history.rounds[2].bytes_up = u64::MAX;
        let dir = temp_dir("round-trip");
        let path = dir.join("nested/run.csv");

        // Execute
        write_csv(&path, &history).unwrap();
        let back = read_csv(&path).unwrap();

        // Assert
        assert_eq!(back, history.rounds);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().next(), Some(CSV_HEADER));
        assert_eq!(text.lines().count(), 4);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn empty_history_writes_only_the_header() {
        let history = run("empty", "fedavg", 0, &[]);

        let text = to_csv(&history.rounds);

        assert_eq!(text, format!("{CSV_HEADER}\n"));
        assert_eq!(parse_csv(&text).unwrap(), Vec::new());
    }

    #[test]
    fn parse_tolerates_crlf_and_blank_lines() {
        let text = format!(
            "{CSV_HEADER}\r\n1,0.5,1.2,10,20,0.3,0.9,40,0.5,7.5,\r\n\r\n2,0.5,1.2,10,20,0.3,0.9,40,0.5,8,2.5\r\n"
        );

        let rounds = parse_csv(&text).unwrap();

        assert_eq!(rounds.len(), 2);
        assert_eq!(rounds[0].bytes_down, 20);
        assert_eq!(rounds[0].clock_s, 7.5);
        assert_eq!(rounds[0].epsilon, None);
        assert_eq!(rounds[1].epsilon, Some(2.5));
    }

    #[test]
    fn files_from_before_the_epsilon_column_still_read() {
        let text = format!("{CSV_HEADER_10}\n1,0.5,1.2,10,20,0.3,0.9,40,0.5,7.5\n");

        let rounds = parse_csv(&text).unwrap();

        assert_eq!(rounds[0].clock_s, 7.5);
        assert_eq!(rounds[0].epsilon, None);
    }

    #[test]
    fn parse_errors_name_the_line_and_column() {
        let bad_number = format!(
            "{CSV_HEADER}\n1,0.5,1.2,10,20,0.3,0.9,40,0.5,7.5,\n2,abc,1.2,10,20,0.3,0.9,40,0.5,9,\n"
        );
        let short_row = format!("{CSV_HEADER}\n1,0.5\n");

        let bad_number = format!("{:#}", parse_csv(&bad_number).unwrap_err());
        let short_row = format!("{:#}", parse_csv(&short_row).unwrap_err());
        let bad_header = format!("{:#}", parse_csv("a,b\n").unwrap_err());

        assert!(
            bad_number.contains("line 3") && bad_number.contains("accuracy"),
            "{bad_number}"
        );
        assert!(short_row.contains("2 columns, expected 11"), "{short_row}");
        assert!(bad_header.contains("expected `round,"), "{bad_header}");
    }
}
