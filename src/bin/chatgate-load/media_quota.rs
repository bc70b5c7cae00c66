//! `media-quota`: one user posts large images over REST, one after another, as fast as
//! the server answers, for `--duration` seconds or until it is refused
//! `--stop-after-refusals` times in a row. Reports the bytes accepted (data URLs as sent,
//! which is what is stored and what the quota counts) per minute, and when and after how
//! much the first refusal came.
//!
//! The user's other budgets must be out of the way, so that only the media quota can
//! refuse; start chatgate with, for example:
//!
//! ```text
//! CHATGATE_LIMITS__MESSAGES_PER_MINUTE=100000 CHATGATE_LIMITS__MESSAGE_BURST=100000 \
//! CHATGATE_LIMITS__REST_PER_MINUTE_PER_IP=100000 CHATGATE_LIMITS__REST_BURST_PER_IP=100000 \
//!   chatgate --dev
//! ```
//!
//! Bar: refused with `media_quota_exceeded` before `--max-mib-per-minute` (200 MiB) were
//! accepted within any minute of the run (run it with `--duration 60`).

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::{Args, ValueEnum};
use serde_json::json;
use tokio::time::Instant;

use crate::{Common, Report, Target, Verdict, http_post_json, username};

/// The refusal the bar waits for.
const QUOTA_CODE: &str = "media_quota_exceeded";
/// Failed exchanges in a row (no answer at all) that end the run.
const MAX_FAILURES_IN_A_ROW: u64 = 10;
/// The window of the per-minute figure, in seconds.
const MINUTE: f64 = 60.0;

/// Flags of `media-quota` (its help names the budgets to raise first).
#[derive(Debug, Args)]
pub struct MediaQuotaArgs {
    /// Image format posted (valid signature and header, then padding).
    #[arg(long, value_enum, default_value_t = ImageFormat::Png)]
    format: ImageFormat,
    /// Decoded bytes of each image (at most the server's chat.max_image_bytes).
    #[arg(long, default_value_t = 4 << 20, value_name = "BYTES")]
    image_bytes: usize,
    /// Stop once this many posts in a row were refused (a large N keeps posting for the
    /// whole --duration, to see what the quota lets through in a minute).
    #[arg(long, default_value_t = 10, value_name = "N")]
    stop_after_refusals: u64,
    /// Bar: MiB of media accepted within any minute before the quota refuses.
    #[arg(long, default_value_t = 200, value_name = "MIB")]
    max_mib_per_minute: u64,
}

/// An image format the server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ImageFormat {
    Png,
    Jpeg,
}

/// A valid image data URL of `bytes` decoded bytes: a 1x1 header, then zeros.
fn image_data_url(format: ImageFormat, bytes: usize) -> String {
    let (mime, mut data) = match format {
        ImageFormat::Png => {
            let mut data = b"\x89PNG\r\n\x1a\n".to_vec();
            data.extend_from_slice(&13u32.to_be_bytes());
            data.extend_from_slice(b"IHDR");
            data.extend_from_slice(&1u32.to_be_bytes());
            data.extend_from_slice(&1u32.to_be_bytes());
            data.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
            ("image/png", data)
        }
        ImageFormat::Jpeg => {
            let mut data = vec![0xFF, 0xD8];
            // APP0 (JFIF).
            data.extend_from_slice(&[0xFF, 0xE0, 0x00, 0x10]);
            data.extend_from_slice(b"JFIF\0");
            data.extend_from_slice(&[1, 1, 0, 0, 1, 0, 1, 0, 0]);
            // SOF0: 8 bits, 1 x 1, three components.
            data.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 8, 0, 1, 0, 1, 3]);
            data.extend_from_slice(&[1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
            ("image/jpeg", data)
        }
    };
    let header = data.len();
    data.resize(bytes.max(header), 0);
    format!("data:{mime};base64,{}", STANDARD.encode(data))
}

/// One post and its answer.
struct Attempt {
    /// Seconds after the first post began.
    at: f64,
    accepted: bool,
    outcome: String,
}

/// The most bytes accepted within any `MINUTE` of the run (`per_post` bytes each).
fn max_per_minute(attempts: &[Attempt], per_post: u64) -> u64 {
    let accepted: Vec<f64> = attempts
        .iter()
        .filter(|a| a.accepted)
        .map(|a| a.at)
        .collect();
    let mut most = 0;
    let mut from = 0;
    for (to, at) in accepted.iter().enumerate() {
        while accepted[from] <= at - MINUTE {
            from += 1;
        }
        most = most.max((to + 1 - from) as u64);
    }
    most * per_post
}

/// `media-quota`: see the module docs.
pub async fn run(
    common: &Common,
    args: &MediaQuotaArgs,
    target: &Target,
    run_id: &str,
) -> Result<(Verdict, Report), String> {
    if !(64..=1 << 30).contains(&args.image_bytes) {
        return Err("--image-bytes must be between 64 and 1 GiB".into());
    }
    if args.stop_after_refusals == 0 {
        return Err("--stop-after-refusals must be at least 1".into());
    }
    let sender = username(run_id, 'm', 0);
    let channel = format!("load-{run_id}-media");
    let content = image_data_url(args.format, args.image_bytes);
    let url_bytes = content.len() as u64;
    let body = json!({
        "sender": sender,
        "channel": channel,
        "message_type": "image",
        "content": content,
    })
    .to_string();
    drop(content);
    eprintln!(
        "media-quota: {sender} posts {} images of {} bytes ({url_bytes} as a data URL) for \
         up to {:.0} s",
        match args.format {
            ImageFormat::Png => "PNG",
            ImageFormat::Jpeg => "JPEG",
        },
        args.image_bytes,
        common.duration
    );
    let start = Instant::now();
    let deadline = start + crate::secs(common.duration);
    let mut attempts: Vec<Attempt> = Vec::new();
    let mut refused_in_a_row = 0;
    let mut failed_in_a_row = 0;
    while Instant::now() < deadline
        && refused_in_a_row < args.stop_after_refusals
        && failed_in_a_row < MAX_FAILURES_IN_A_ROW
    {
        let at = start.elapsed().as_secs_f64();
        let (accepted, outcome) =
            match http_post_json(target, "/api/chat/message", body.as_bytes(), None).await {
                Ok(answer) => {
                    failed_in_a_row = 0;
                    (answer.status == 200, answer.outcome())
                }
                Err(e) => {
                    failed_in_a_row += 1;
                    (
                        false,
                        format!("failed: {}", e.chars().take(60).collect::<String>()),
                    )
                }
            };
        if accepted {
            refused_in_a_row = 0;
        } else if !outcome.starts_with("failed") {
            refused_in_a_row += 1;
        }
        attempts.push(Attempt {
            at,
            accepted,
            outcome,
        });
    }
    let elapsed = start.elapsed().as_secs_f64();

    let accepted = attempts.iter().filter(|a| a.accepted).count() as u64;
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    for a in &attempts {
        *outcomes.entry(a.outcome.clone()).or_default() += 1;
    }
    let first_refusal = attempts
        .iter()
        .position(|a| !a.accepted && !a.outcome.starts_with("failed"));
    let per_minute = max_per_minute(&attempts, url_bytes);
    #[allow(clippy::cast_precision_loss)]
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);

    let mut r = Report::new("media-quota", run_id, target);
    r.section("setup", "setup");
    r.text("sender", "sender", &sender);
    r.int(
        "image bytes (decoded)",
        "image_bytes",
        args.image_bytes as u64,
    );
    r.int("data URL bytes", "url_bytes", url_bytes);
    r.num("ran", "seconds", elapsed, " s");
    r.section("posts", "posts");
    r.int("posts", "posts", attempts.len() as u64);
    r.int("accepted", "accepted", accepted);
    r.counts("answers", "answers", &outcomes);
    r.num(
        "MiB accepted",
        "accepted_mib",
        mib(accepted * url_bytes),
        " MiB",
    );
    #[allow(clippy::cast_precision_loss)]
    let rate = mib(accepted * url_bytes) * MINUTE / elapsed.max(1e-9);
    r.num(
        "average rate over the run",
        "mib_per_minute_avg",
        rate,
        " MiB/min",
    );
    r.num(
        "most accepted within a minute",
        "mib_per_minute_max",
        mib(per_minute),
        " MiB",
    );
    if elapsed < MINUTE && refused_in_a_row < args.stop_after_refusals {
        r.warn(format!(
            "the run lasted {elapsed:.0} s, less than a minute: the per-minute figure is \
             what it accepted in that time"
        ));
    }
    match first_refusal {
        Some(i) => {
            let before = attempts[..i].iter().filter(|a| a.accepted).count() as u64;
            let first = &attempts[i];
            r.put(
                "first refusal",
                "first_refusal",
                json!({
                    "at_secs": (first.at * 1000.0).round() / 1000.0,
                    "answer": first.outcome,
                    "accepted_before": before,
                    "mib_before": mib(before * url_bytes),
                }),
                format!(
                    "{} after {:.2} s, {before} accepted before it ({:.1} MiB)",
                    first.outcome,
                    first.at,
                    mib(before * url_bytes)
                ),
            );
            if !first.outcome.contains(QUOTA_CODE) {
                r.warn(format!(
                    "the first refusal was {}, not {QUOTA_CODE}: raise the user's other \
                     budgets (see --help)",
                    first.outcome
                ));
            }
        }
        None => r.text("first refusal", "first_refusal", "none"),
    }
    let quota_refused = first_refusal.is_some_and(|i| attempts[i].outcome.contains(QUOTA_CODE));
    r.section("bars", "bars");
    let met = quota_refused && per_minute < args.max_mib_per_minute << 20;
    r.bar(
        &format!(
            "{QUOTA_CODE} before {} MiB in a minute",
            args.max_mib_per_minute
        ),
        "media_quota",
        &format!(
            "{}, at most {:.1} MiB accepted within a minute",
            if quota_refused {
                "refused"
            } else {
                "not refused by the quota"
            },
            mib(per_minute)
        ),
        met,
    );
    Ok((if met { Verdict::Pass } else { Verdict::Fail }, r))
}

#[cfg(test)]
mod tests {
    use chatgate::content::{MediaKind, MediaLimits, check_media};

    use super::*;

    #[test]
    fn the_images_are_ones_the_server_accepts() {
        for format in [ImageFormat::Png, ImageFormat::Jpeg] {
            let url = image_data_url(format, 64 << 10);
            let media = check_media(MediaKind::Image, &url, &MediaLimits::default()).unwrap();
            assert_eq!(media.decoded_bytes, 64 << 10, "{format:?}");
            assert_eq!(
                (media.width, media.height),
                (Some(1), Some(1)),
                "{format:?}"
            );
        }
    }

    fn attempt(at: f64, accepted: bool) -> Attempt {
        Attempt {
            at,
            accepted,
            outcome: String::new(),
        }
    }

    #[test]
    fn the_busiest_minute_is_found() {
        let attempts = [
            attempt(0.0, true),
            attempt(10.0, true),
            attempt(59.0, true),
            attempt(60.0, true),
            attempt(61.0, false),
            attempt(65.0, true),
            attempt(200.0, true),
        ];
        // 10, 59, 60, 65 lie within one minute.
        assert_eq!(max_per_minute(&attempts, 5), 20);
        assert_eq!(max_per_minute(&[], 5), 0);
    }
}
