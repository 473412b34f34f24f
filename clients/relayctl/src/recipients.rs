//! The recipients file of `relayctl broadcast`, read as a stream: one `user@platform` per
//! line (blank lines and `#` comments skipped), or a CSV whose header names an `address`,
//! `recipient` or `user` column. A file is CSV when its first line (after blank lines and
//! comments) contains a comma.
//!
//! Addresses are not checked here: the relay counts a bad one as rejected without failing
//! the campaign (SPEC.md 9.3), and the summary reports it.

use anyhow::{Context, bail};
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;

/// Column names that hold the address in a CSV file, in order of preference.
const CSV_COLUMNS: [&str; 3] = ["address", "recipient", "user"];

/// Recipients of a file, one at a time.
pub struct Recipients {
    inner: Inner,
}

enum Inner {
    Lines(std::io::Lines<BufReader<File>>),
    Csv {
        records: csv::StringRecordsIntoIter<BufReader<File>>,
        column: usize,
    },
}

fn skipped(line: &str) -> bool {
    let line = line.trim();
    line.is_empty() || line.starts_with('#')
}

/// The first line that is not blank or a comment, if any.
fn first_line(reader: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if !skipped(&line) {
            return Ok(Some(line));
        }
    }
}

/// Opens `path` and decides how to read it.
pub fn open(path: &Path) -> anyhow::Result<Recipients> {
    let mut file =
        File::open(path).with_context(|| format!("opening recipients file {}", path.display()))?;
    let header = first_line(&mut BufReader::new(&mut file))
        .with_context(|| format!("reading {}", path.display()))?;
    file.seek(SeekFrom::Start(0))?;
    let reader = BufReader::new(file);
    let inner = match header {
        Some(line) if line.contains(',') => csv_records(reader, path)?,
        _ => Inner::Lines(reader.lines()),
    };
    Ok(Recipients { inner })
}

fn csv_records(reader: BufReader<File>, path: &Path) -> anyhow::Result<Inner> {
    let mut csv = csv::ReaderBuilder::new()
        .comment(Some(b'#'))
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(reader);
    let headers = csv
        .headers()
        .with_context(|| format!("reading the CSV header of {}", path.display()))?;
    let column = CSV_COLUMNS.iter().find_map(|want| {
        headers
            .iter()
            .position(|h| h.trim_matches('\u{feff}').eq_ignore_ascii_case(want))
    });
    let Some(column) = column else {
        bail!(
            "{}: the CSV header ({}) has no column named address, recipient or user",
            path.display(),
            headers.iter().collect::<Vec<_>>().join(",")
        );
    };
    Ok(Inner::Csv {
        records: csv.into_records(),
        column,
    })
}

impl Iterator for Recipients {
    type Item = anyhow::Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match &mut self.inner {
                Inner::Lines(lines) => match lines.next()? {
                    Ok(line) if skipped(&line) => continue,
                    Ok(line) => return Some(Ok(line.trim().to_string())),
                    Err(e) => return Some(Err(e.into())),
                },
                Inner::Csv { records, column } => match records.next()? {
                    Ok(record) => match record.get(*column) {
                        Some(value) if !value.is_empty() => return Some(Ok(value.to_string())),
                        _ => continue,
                    },
                    Err(e) => return Some(Err(anyhow::Error::new(e).context("recipients CSV"))),
                },
            }
        }
    }
}

/// Up to `size` recipients at a time.
pub fn chunks(
    mut recipients: Recipients,
    size: usize,
) -> impl Iterator<Item = anyhow::Result<Vec<String>>> {
    std::iter::from_fn(move || {
        let mut chunk = Vec::with_capacity(size.min(16_384));
        for recipient in recipients.by_ref() {
            match recipient {
                Ok(r) => chunk.push(r),
                Err(e) => return Some(Err(e)),
            }
            if chunk.len() == size {
                break;
            }
        }
        (!chunk.is_empty()).then_some(Ok(chunk))
    })
}

/// A quick estimate of how many recipients `path` lists, for the progress display: lines
/// that are not blank or comments, less the header of a CSV file.
pub fn count(path: &Path) -> anyhow::Result<u64> {
    let file =
        File::open(path).with_context(|| format!("opening recipients file {}", path.display()))?;
    count_in(BufReader::with_capacity(1 << 16, file))
        .with_context(|| format!("reading {}", path.display()))
}

fn count_in(mut reader: impl BufRead) -> std::io::Result<u64> {
    let Some(first) = first_line(&mut reader)? else {
        return Ok(0);
    };
    let mut lines = if first.contains(',') { 0 } else { 1 };
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(lines);
        }
        if !skipped(&String::from_utf8_lossy(&line)) {
            lines += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count_text(text: &str) -> u64 {
        count_in(std::io::Cursor::new(text)).unwrap()
    }

    fn read(text: &str) -> anyhow::Result<Vec<String>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("r");
        std::fs::write(&path, text)?;
        open(&path)?.collect()
    }

    #[test]
    fn one_address_per_line() {
        let text = "# list\n\nann@beta\n  bob@gamma  \n# done\ncy@beta";
        assert_eq!(read(text).unwrap(), ["ann@beta", "bob@gamma", "cy@beta"]);
        assert_eq!(count_text(text), 3);
    }

    #[test]
    fn csv_picks_the_address_column_and_handles_quotes() {
        let text = "name,Recipient,note\n\"Doe, Ann\",ann@beta,x\nBob,bob@gamma,\"a \"\"q\"\" b\"\nNo one,,\n";
        assert_eq!(read(text).unwrap(), ["ann@beta", "bob@gamma"]);
        assert_eq!(count_text(text), 3, "header not counted");
        let err = read("name,phone\nann,1\n").unwrap_err();
        assert!(
            err.to_string().contains("address, recipient or user"),
            "{err}"
        );
        assert_eq!(read("user,x\r\nann@beta,1\r\n").unwrap(), ["ann@beta"]);
    }

    #[test]
    fn chunks_of_a_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        std::fs::write(&path, "a@b\nc@d\ne@f\n").unwrap();
        let got: Vec<Vec<String>> = chunks(open(&path).unwrap(), 2)
            .collect::<anyhow::Result<_>>()
            .unwrap();
        assert_eq!(got, [vec!["a@b", "c@d"], vec!["e@f"]]);
        std::fs::write(&path, "").unwrap();
        assert_eq!(chunks(open(&path).unwrap(), 2).count(), 0);
        assert_eq!(count(&path).unwrap(), 0);
    }
}
