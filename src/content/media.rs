//! Image and audio messages: strict base64 `data:` URLs whose bytes are what they claim to
//! be. The rules are listed in the [module docs](super).
//!
//! Checks run cheapest first, and nothing is decoded until the length is known to fit:
//! length → header → exact decoded size → signature (first chunk) → base64 (the rest) →
//! image dimensions. The data is decoded a chunk at a time into one small buffer and only
//! its first [`HEAD_BYTES`] are kept, so checking a 10 MiB clip allocates kilobytes, not
//! another 10 MiB.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::{DecodeError, DecodeSliceError, Engine as _};
use imagesize::ImageType;

use super::{ContentError, ContentErrorKind};

/// One spelling per byte string: standard alphabet, `=` padding required, unused trailing
/// bits zero. Because decoding is then one-to-one, a URL that passes re-encodes to itself,
/// so storing the original string is the same as storing what we checked.
const STRICT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_allow_trailing_bits(false)
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical),
);

/// Decoded bytes kept for the signature and image-header checks.
const HEAD_BYTES: usize = 256 * 1024;
/// Base64 characters decoded at a time (a multiple of 4: no chunk but the last may hold
/// padding).
const CHUNK_CHARS: usize = 64 * 1024;

const SCHEME: &str = "data:";
const BASE64_MARKER: &str = ";base64,";

/// What a message's `message_type` says its content is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    Image,
    Audio,
}

impl MediaKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Audio => "audio",
        }
    }
}

/// Caps on media content, from configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaLimits {
    /// Largest decoded image, in bytes.
    pub max_image_bytes: usize,
    /// Largest decoded audio clip, in bytes.
    pub max_audio_bytes: usize,
    /// Largest width × height. A few kilobytes of PNG can declare a 50 000 × 50 000 canvas,
    /// and whoever decodes it allocates for the canvas, not the file.
    pub max_image_pixels: u64,
    /// Largest width or height, in pixels.
    pub max_image_side: u32,
}

impl Default for MediaLimits {
    fn default() -> Self {
        Self {
            max_image_bytes: 5 << 20,
            max_audio_bytes: 10 << 20,
            max_image_pixels: 40_000_000,
            max_image_side: 16_384,
        }
    }
}

impl MediaLimits {
    fn max_bytes(&self, kind: MediaKind) -> usize {
        match kind {
            MediaKind::Image => self.max_image_bytes,
            MediaKind::Audio => self.max_audio_bytes,
        }
    }
}

/// What a valid data URL holds. The URL itself is stored unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidMedia {
    /// The declared media type, now verified against the bytes.
    pub mime: &'static str,
    /// Size of the data once decoded.
    pub decoded_bytes: usize,
    /// Images only, read from the header.
    pub width: Option<u32>,
    /// Images only, read from the header.
    pub height: Option<u32>,
}

/// An allowed media type and how to recognise its bytes.
struct Format {
    mime: &'static str,
    kind: MediaKind,
    /// Whether decoded bytes start with this type's file signature.
    sniff: fn(&[u8]) -> bool,
    /// How `imagesize` names the format, for images.
    image: Option<ImageType>,
}

/// The allow-list. No SVG, HTML or XML: those can carry script.
static FORMATS: [Format; 13] = [
    Format::image("image/jpeg", is_jpeg, ImageType::Jpeg),
    Format::image("image/png", is_png, ImageType::Png),
    Format::image("image/gif", is_gif, ImageType::Gif),
    Format::image("image/webp", is_webp, ImageType::Webp),
    Format::audio("audio/webm", is_webm),
    Format::audio("audio/ogg", is_ogg),
    Format::audio("audio/mpeg", is_mpeg),
    Format::audio("audio/wav", is_wav),
    Format::audio("audio/x-wav", is_wav),
    Format::audio("audio/wave", is_wav),
    Format::audio("audio/mp4", is_mp4),
    Format::audio("audio/x-m4a", is_mp4),
    Format::audio("audio/aac", is_adts),
];

impl Format {
    const fn image(mime: &'static str, sniff: fn(&[u8]) -> bool, image: ImageType) -> Self {
        Self {
            mime,
            kind: MediaKind::Image,
            sniff,
            image: Some(image),
        }
    }

    const fn audio(mime: &'static str, sniff: fn(&[u8]) -> bool) -> Self {
        Self {
            mime,
            kind: MediaKind::Audio,
            sniff,
            image: None,
        }
    }
}

/// The longest data URL any kind may send: the bound to give WebSocket message and request
/// body limits (plus room for the JSON around it).
#[must_use]
pub fn max_encoded_len(limits: &MediaLimits) -> usize {
    max_url_len(limits, MediaKind::Image).max(max_url_len(limits, MediaKind::Audio))
}

/// Checks that `content` is an allowed, well-formed data URL of `kind` within `limits`.
///
/// # Errors
/// `media_too_large`, `invalid_media` (not a strict base64 data URL, or an image header
/// that cannot be read), `media_type_not_allowed`, `media_type_mismatch` or
/// `media_dimensions_too_large`.
pub fn check_media(
    kind: MediaKind,
    content: &str,
    limits: &MediaLimits,
) -> Result<ValidMedia, ContentError> {
    let max_bytes = limits.max_bytes(kind);
    if content.len() > max_url_len(limits, kind) {
        return Err(too_large(kind, max_bytes));
    }
    let (format, data) = parse_header(kind, content)?;
    check_decoded_len(data, kind, max_bytes)?;
    let (head, decoded_bytes) = decode_head(data, format)?;
    let (width, height) = match format.image {
        Some(image) => {
            // An image whose header is not within the head (a JPEG with large metadata
            // before its frame header) is read whole; the data is valid base64 by now.
            let (width, height) = match dimensions(image, &head, limits) {
                Err(e) if decoded_bytes > head.len() => {
                    let whole = STRICT_BASE64.decode(data).map_err(base64_error)?;
                    dimensions(image, &whole, limits).map_err(|_| e)?
                }
                other => other?,
            };
            (Some(width), Some(height))
        }
        None => (None, None),
    };
    Ok(ValidMedia {
        mime: format.mime,
        decoded_bytes,
        width,
        height,
    })
}

/// Decodes `data` a chunk at a time: checks the signature on the first chunk (a mismatch
/// is refused before the rest is decoded), then that all of it is strict base64. Returns
/// the first [`HEAD_BYTES`] decoded bytes and the decoded size.
fn decode_head(data: &str, format: &Format) -> Result<(Vec<u8>, usize), ContentError> {
    let mut chunk = vec![0u8; CHUNK_CHARS / 4 * 3];
    let mut head = Vec::new();
    let mut total = 0;
    let chunks = data.as_bytes().chunks(CHUNK_CHARS);
    let last = chunks.len() - 1;
    for (i, text) in chunks.enumerate() {
        let base = i * CHUNK_CHARS;
        // Padding is allowed at the very end only; a chunk of its own would accept it.
        if i < last
            && let Some(at) = text.iter().position(|&b| b == b'=')
        {
            return Err(base64_error(DecodeError::InvalidByte(base + at, b'=')));
        }
        let n = STRICT_BASE64
            .decode_slice(text, &mut chunk)
            .map_err(|e| match e {
                DecodeSliceError::DecodeError(e) => base64_error(shifted(e, base)),
                DecodeSliceError::OutputSliceTooSmall => invalid("media data could not be decoded"),
            })?;
        if head.len() < HEAD_BYTES {
            head.extend_from_slice(&chunk[..n.min(HEAD_BYTES - head.len())]);
        }
        if i == 0 && !(format.sniff)(&head) {
            return Err(mismatch(format, &head));
        }
        total += n;
    }
    Ok((head, total))
}

/// A decode error of a chunk, with its offset in the whole data.
fn shifted(error: DecodeError, base: usize) -> DecodeError {
    match error {
        DecodeError::InvalidByte(offset, byte) => DecodeError::InvalidByte(base + offset, byte),
        DecodeError::InvalidLastSymbol {
            offset,
            symbol,
            symbol_value,
        } => DecodeError::InvalidLastSymbol {
            offset: base + offset,
            symbol,
            symbol_value,
        },
        other => other,
    }
}

/// Base64 characters needed for `max_bytes` bytes.
fn encoded_cap(max_bytes: usize) -> usize {
    max_bytes.div_ceil(3).saturating_mul(4)
}

fn max_url_len(limits: &MediaLimits, kind: MediaKind) -> usize {
    let longest_mime = FORMATS
        .iter()
        .filter(|format| format.kind == kind)
        .map(|format| format.mime.len())
        .max()
        .unwrap_or(0);
    (SCHEME.len() + longest_mime + BASE64_MARKER.len())
        .saturating_add(encoded_cap(limits.max_bytes(kind)))
}

fn invalid(detail: impl Into<String>) -> ContentError {
    ContentError::new(ContentErrorKind::InvalidMedia, detail)
}

fn too_large(kind: MediaKind, max_bytes: usize) -> ContentError {
    ContentError::new(
        ContentErrorKind::MediaTooLarge,
        format!(
            "{} content must be at most {max_bytes} bytes once decoded ({} base64 characters)",
            kind.as_str(),
            encoded_cap(max_bytes)
        ),
    )
}

/// Splits `data:<type>;base64,<data>` into the allowed format and the data.
fn parse_header(kind: MediaKind, content: &str) -> Result<(&'static Format, &str), ContentError> {
    let shape = || {
        invalid(format!(
            "{} content must be a data URL: data:<type>;base64,<data>",
            kind.as_str()
        ))
    };
    let Some(rest) = content.strip_prefix(SCHEME) else {
        return Err(
            if content
                .get(..SCHEME.len())
                .is_some_and(|scheme| scheme.eq_ignore_ascii_case(SCHEME))
            {
                invalid("the data: scheme must be lowercase")
            } else {
                shape()
            },
        );
    };
    let (header, data) = rest.split_once(',').ok_or_else(shape)?;
    let (mime, parameters) = match header.split_once(';') {
        Some((mime, parameters)) => (mime, Some(parameters)),
        None => (header, None),
    };
    let format = find_format(kind, mime)?;
    match parameters {
        Some("base64") => Ok((format, data)),
        Some(token) if token.eq_ignore_ascii_case("base64") => {
            Err(invalid("the ;base64 marker must be lowercase"))
        }
        Some(_) => Err(invalid(
            "no parameters are allowed: the header must be exactly data:<type>;base64,",
        )),
        None => Err(invalid(
            "media data must be base64: data:<type>;base64,<data>",
        )),
    }
}

fn find_format(kind: MediaKind, mime: &str) -> Result<&'static Format, ContentError> {
    let allowed = || {
        FORMATS
            .iter()
            .filter(|format| format.kind == kind)
            .map(|format| format.mime)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(format) = FORMATS.iter().find(|format| format.mime == mime) {
        if format.kind == kind {
            return Ok(format);
        }
        return Err(ContentError::new(
            ContentErrorKind::MediaTypeNotAllowed,
            format!(
                "{} is not an {} type; {} messages accept {}",
                format.mime,
                kind.as_str(),
                kind.as_str(),
                allowed()
            ),
        ));
    }
    if FORMATS
        .iter()
        .any(|format| format.mime.eq_ignore_ascii_case(mime))
    {
        return Err(invalid("the media type must be lowercase"));
    }
    Err(ContentError::new(
        ContentErrorKind::MediaTypeNotAllowed,
        format!("{} messages accept only {}", kind.as_str(), allowed()),
    ))
}

/// Checks the decoded size from the length and padding alone, so nothing oversized is ever
/// decoded. Canonical base64 has a length that is a multiple of four.
fn check_decoded_len(data: &str, kind: MediaKind, max_bytes: usize) -> Result<(), ContentError> {
    if data.len() > encoded_cap(max_bytes) {
        return Err(too_large(kind, max_bytes));
    }
    if data.is_empty() {
        return Err(invalid("media data must not be empty"));
    }
    if !data.len().is_multiple_of(4) {
        return Err(invalid(
            "base64 data must be padded with = to a multiple of 4 characters",
        ));
    }
    let padding = data.bytes().rev().take(2).filter(|&b| b == b'=').count();
    // At least 4 characters and at most 2 of padding, so this cannot underflow.
    if data.len() / 4 * 3 - padding > max_bytes {
        return Err(too_large(kind, max_bytes));
    }
    Ok(())
}

fn base64_error(error: DecodeError) -> ContentError {
    let why = match error {
        DecodeError::InvalidByte(offset, byte) if byte.is_ascii_graphic() => format!(
            "{:?} at offset {offset} of the data is not allowed (standard alphabet \
             A-Z a-z 0-9 + /, and = only at the end)",
            char::from(byte)
        ),
        DecodeError::InvalidByte(offset, byte) => {
            format!(
                "byte 0x{byte:02X} at offset {offset} of the data is not allowed \
                 (whitespace, controls and non-ASCII are not base64)"
            )
        }
        DecodeError::InvalidLength(_) => "its length is not valid".to_string(),
        DecodeError::InvalidLastSymbol { offset, .. } => format!(
            "the character at offset {offset} of the data has unused bits set, which an \
             encoder never produces"
        ),
        DecodeError::InvalidPadding => "its = padding is not canonical".to_string(),
    };
    invalid(format!(
        "media data is not canonical standard base64: {why}"
    ))
}

fn mismatch(format: &Format, bytes: &[u8]) -> ContentError {
    let detail = match FORMATS.iter().find(|other| (other.sniff)(bytes)) {
        Some(actual) => format!(
            "the data is declared {} but looks like {}",
            format.mime, actual.mime
        ),
        None => format!(
            "the data is declared {} but does not start with its file signature",
            format.mime
        ),
    };
    ContentError::new(ContentErrorKind::MediaTypeMismatch, detail)
}

/// Width and height from the header only, within the limits.
fn dimensions(
    image: ImageType,
    bytes: &[u8],
    limits: &MediaLimits,
) -> Result<(u32, u32), ContentError> {
    let unreadable = || invalid("the image header cannot be read");
    // Our signature check and imagesize's must agree, or the size would be read as
    // another format's.
    if imagesize::image_type(bytes).ok() != Some(image) {
        return Err(unreadable());
    }
    let size = imagesize::blob_size(bytes).map_err(|_| unreadable())?;
    if size.width == 0 || size.height == 0 {
        return Err(invalid("the image has no pixels"));
    }
    let too_large = || {
        ContentError::new(
            ContentErrorKind::MediaDimensionsTooLarge,
            format!(
                "the image is {}x{} pixels; at most {} per side and {} in all are allowed",
                size.width, size.height, limits.max_image_side, limits.max_image_pixels
            ),
        )
    };
    let width = u32::try_from(size.width).map_err(|_| too_large())?;
    let height = u32::try_from(size.height).map_err(|_| too_large())?;
    if width > limits.max_image_side
        || height > limits.max_image_side
        || u64::from(width) * u64::from(height) > limits.max_image_pixels
    {
        return Err(too_large());
    }
    Ok((width, height))
}

fn is_png(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x89PNG\r\n\x1a\n")
}

fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

fn is_gif(bytes: &[u8]) -> bool {
    bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a")
}

fn is_riff(bytes: &[u8], form: [u8; 4]) -> bool {
    bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(&form[..])
}

fn is_webp(bytes: &[u8]) -> bool {
    is_riff(bytes, *b"WEBP")
}

fn is_wav(bytes: &[u8]) -> bool {
    is_riff(bytes, *b"WAVE")
}

/// An EBML header whose DocType is `webm` (plain Matroska is not WebM).
fn is_webm(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1A, 0x45, 0xDF, 0xA3])
        && bytes
            .get(4..bytes.len().min(64))
            .is_some_and(|header| header.windows(4).any(|window| window == b"webm"))
}

fn is_ogg(bytes: &[u8]) -> bool {
    bytes.starts_with(b"OggS")
}

/// An ID3 tag, or an MPEG audio frame header: 11 sync bits, a version that is not the
/// reserved one, and a layer that is not 0 (layer 0 is AAC's ADTS).
fn is_mpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(b"ID3")
        || matches!(bytes, [0xFF, second, ..]
            if second & 0xE0 == 0xE0 && second & 0x18 != 0x08 && second & 0x06 != 0)
}

/// An ISO base media file: an `ftyp` box first.
fn is_mp4(bytes: &[u8]) -> bool {
    bytes.get(4..8) == Some(&b"ftyp"[..])
}

/// An ADTS frame header: 12 sync bits and layer 0.
fn is_adts(bytes: &[u8]) -> bool {
    matches!(bytes, [0xFF, second, ..] if second & 0xF6 == 0xF0)
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::STANDARD;
    use proptest::prelude::*;

    use super::*;

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
            }
        }
        !crc
    }

    /// A PNG signature and a real IHDR chunk (8-bit RGB), then IEND.
    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = b"IHDR".to_vec();
        chunk.extend(width.to_be_bytes());
        chunk.extend(height.to_be_bytes());
        chunk.extend([8, 2, 0, 0, 0]);
        bytes.extend(13u32.to_be_bytes());
        bytes.extend(&chunk);
        bytes.extend(crc32(&chunk).to_be_bytes());
        bytes.extend(0u32.to_be_bytes());
        bytes.extend(b"IEND");
        bytes.extend(crc32(b"IEND").to_be_bytes());
        bytes
    }

    /// SOI, a JFIF APP0 segment, then a baseline SOF0 giving the size.
    fn jpeg(width: u16, height: u16) -> Vec<u8> {
        let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10];
        bytes.extend(b"JFIF\0\x01\x01\x00\x00\x01\x00\x01\x00\x00");
        bytes.extend([0xFF, 0xC0, 0x00, 0x11, 0x08]);
        bytes.extend(height.to_be_bytes());
        bytes.extend(width.to_be_bytes());
        bytes.extend([0x03, 0x01, 0x22, 0x00, 0x02, 0x11, 0x01, 0x03, 0x11, 0x01]);
        bytes.extend([0xFF, 0xD9]);
        bytes
    }

    fn gif(width: u16, height: u16) -> Vec<u8> {
        let mut bytes = b"GIF89a".to_vec();
        bytes.extend(width.to_le_bytes());
        bytes.extend(height.to_le_bytes());
        bytes.extend([0x00, 0x00, 0x00, b';']);
        bytes
    }

    /// A lossless (VP8L) WebP header.
    fn webp(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = b"RIFF".to_vec();
        bytes.extend(26u32.to_le_bytes());
        bytes.extend(b"WEBPVP8L");
        bytes.extend(13u32.to_le_bytes());
        bytes.push(0x2F);
        bytes.extend(((width - 1) | ((height - 1) << 14)).to_le_bytes());
        bytes.extend([0; 8]);
        bytes
    }

    fn ogg() -> Vec<u8> {
        let mut bytes = b"OggS\x00\x02".to_vec();
        bytes.extend([0; 21]);
        bytes
    }

    fn webm() -> Vec<u8> {
        let mut bytes = vec![0x1A, 0x45, 0xDF, 0xA3, 0x9F];
        bytes.extend([0x42, 0x86, 0x81, 0x01, 0x42, 0xF7, 0x81, 0x01]);
        bytes.extend([0x42, 0xF2, 0x81, 0x04, 0x42, 0xF3, 0x81, 0x08]);
        bytes.extend([0x42, 0x82, 0x84]);
        bytes.extend(b"webm");
        bytes.extend([0x42, 0x87, 0x81, 0x04, 0x42, 0x85, 0x81, 0x02]);
        bytes
    }

    fn wav() -> Vec<u8> {
        let mut bytes = b"RIFF".to_vec();
        bytes.extend(36u32.to_le_bytes());
        bytes.extend(b"WAVEfmt ");
        bytes.extend(16u32.to_le_bytes());
        bytes.extend([1, 0, 1, 0, 0x40, 0x1F, 0, 0, 0x80, 0x3E, 0, 0, 2, 0, 16, 0]);
        bytes.extend(b"data");
        bytes.extend(0u32.to_le_bytes());
        bytes
    }

    fn mp3_with_id3() -> Vec<u8> {
        let mut bytes = b"ID3\x04\x00\x00\x00\x00\x00\x00".to_vec();
        bytes.extend([0xFF, 0xFB, 0x90, 0x64, 0, 0, 0, 0]);
        bytes
    }

    fn mp3_frame() -> Vec<u8> {
        vec![0xFF, 0xFB, 0x90, 0x64, 0, 0, 0, 0]
    }

    fn m4a() -> Vec<u8> {
        let mut bytes = 24u32.to_be_bytes().to_vec();
        bytes.extend(b"ftypM4A \x00\x00\x02\x00isomM4A ");
        bytes
    }

    fn adts() -> Vec<u8> {
        vec![0xFF, 0xF1, 0x50, 0x80, 0x02, 0x1F, 0xFC]
    }

    fn url(mime: &str, bytes: &[u8]) -> String {
        format!("data:{mime};base64,{}", STANDARD.encode(bytes))
    }

    fn check(kind: MediaKind, content: &str) -> Result<ValidMedia, ContentError> {
        check_media(kind, content, &MediaLimits::default())
    }

    fn code(kind: MediaKind, content: &str) -> &'static str {
        check(kind, content).unwrap_err().code()
    }

    #[test]
    fn large_data_is_checked_a_chunk_at_a_time() {
        // Audio of several chunks: the size is counted, nothing else kept.
        let mut clip = webm();
        clip.resize(300_000, 7);
        let content = url("audio/webm", &clip);
        assert_eq!(
            check(MediaKind::Audio, &content).unwrap().decoded_bytes,
            300_000
        );

        // A bad byte deep in the data is reported at its offset in the whole data.
        let data_at = content.find(',').unwrap() + 1;
        let mut bad = content.clone().into_bytes();
        bad[data_at + 200_001] = b'*';
        let bad = String::from_utf8(bad).unwrap();
        let error = check(MediaKind::Audio, &bad).unwrap_err();
        assert_eq!(error.code(), "invalid_media");
        assert!(error.to_string().contains("offset 200001"), "{error}");

        // Padding at the end of a chunk that is not the last is still refused.
        let short = STANDARD.encode(&clip[..CHUNK_CHARS / 4 * 3 - 1]);
        assert!(short.ends_with('='));
        let joined = format!("data:audio/webm;base64,{short}{}", STANDARD.encode(b"abc"));
        assert_eq!(code(MediaKind::Audio, &joined), "invalid_media");

        // A mismatched signature is refused from the first chunk.
        assert_eq!(
            code(MediaKind::Audio, &url("audio/webm", &vec![0u8; 300_000])),
            "media_type_mismatch"
        );
    }

    #[test]
    fn a_jpeg_header_beyond_the_head_is_still_read() {
        // SOI, then comment segments (COM, at most 65535 bytes each) up to 400 kB, then
        // the frame header.
        let mut bytes = vec![0xFF, 0xD8];
        while bytes.len() < 400_000 {
            bytes.extend([0xFF, 0xFE, 0xFF, 0xFF]);
            bytes.extend(std::iter::repeat_n(b'c', 0xFFFF - 2));
        }
        bytes.extend(&jpeg(3, 2)[20..]);
        let media = check(MediaKind::Image, &url("image/jpeg", &bytes)).unwrap();
        assert_eq!((media.width, media.height), (Some(3), Some(2)));
    }

    #[test]
    fn valid_images_report_their_size() {
        let cases = [
            ("image/png", png(3, 2)),
            ("image/jpeg", jpeg(3, 2)),
            ("image/gif", gif(3, 2)),
            ("image/webp", webp(3, 2)),
        ];
        for (mime, bytes) in cases {
            let content = url(mime, &bytes);
            assert_eq!(
                check(MediaKind::Image, &content).unwrap(),
                ValidMedia {
                    mime,
                    decoded_bytes: bytes.len(),
                    width: Some(3),
                    height: Some(2),
                },
                "{mime}"
            );
        }
    }

    #[test]
    fn valid_audio_passes() {
        let cases = [
            ("audio/ogg", ogg()),
            ("audio/webm", webm()),
            ("audio/wav", wav()),
            ("audio/x-wav", wav()),
            ("audio/wave", wav()),
            ("audio/mpeg", mp3_with_id3()),
            ("audio/mpeg", mp3_frame()),
            ("audio/mp4", m4a()),
            ("audio/x-m4a", m4a()),
            ("audio/aac", adts()),
        ];
        for (mime, bytes) in cases {
            let media = check(MediaKind::Audio, &url(mime, &bytes)).unwrap();
            assert_eq!(media.mime, mime);
            assert_eq!(media.decoded_bytes, bytes.len());
            assert_eq!((media.width, media.height), (None, None));
        }
    }

    #[test]
    fn dangerous_and_unknown_types_are_not_allowed() {
        let svg = url("image/svg+xml", b"<svg onload=alert(1)>");
        assert_eq!(code(MediaKind::Image, &svg), "media_type_not_allowed");
        for mime in [
            "text/html",
            "application/xhtml+xml",
            "text/xml",
            "application/octet-stream",
            "image/bmp",
            "image/",
            "",
        ] {
            let content = url(mime, b"<script>alert(1)</script>");
            assert_eq!(code(MediaKind::Image, &content), "media_type_not_allowed");
            assert_eq!(code(MediaKind::Audio, &content), "media_type_not_allowed");
        }
    }

    #[test]
    fn the_type_must_fit_the_message_kind() {
        let error = check(MediaKind::Audio, &url("image/png", &png(1, 1))).unwrap_err();
        assert_eq!(error.code(), "media_type_not_allowed");
        assert!(error.detail().contains("audio/ogg"), "{}", error.detail());
        let error = check(MediaKind::Image, &url("audio/ogg", &ogg())).unwrap_err();
        assert_eq!(error.code(), "media_type_not_allowed");
    }

    #[test]
    fn bytes_must_match_the_declared_type() {
        let error = check(MediaKind::Image, &url("image/png", &gif(1, 1))).unwrap_err();
        assert_eq!(error.code(), "media_type_mismatch");
        assert!(error.detail().contains("image/gif"), "{}", error.detail());
        for (kind, mime, bytes) in [
            (MediaKind::Image, "image/jpeg", png(1, 1)),
            (MediaKind::Image, "image/webp", wav()),
            (
                MediaKind::Image,
                "image/png",
                b"<svg onload=alert(1)>".to_vec(),
            ),
            (MediaKind::Audio, "audio/wav", webp(1, 1)),
            (MediaKind::Audio, "audio/aac", mp3_frame()),
            (MediaKind::Audio, "audio/mpeg", adts()),
            (
                MediaKind::Audio,
                "audio/webm",
                b"\x1a\x45\xdf\xa3\x84matroska".to_vec(),
            ),
            (MediaKind::Audio, "audio/ogg", b"<html><script>".to_vec()),
        ] {
            assert_eq!(
                code(kind, &url(mime, &bytes)),
                "media_type_mismatch",
                "{mime}"
            );
        }
    }

    #[test]
    fn base64_must_be_canonical_standard() {
        // 47 bytes (a PNG and two trailing zeros): the encoding ends in `AAA=`.
        let mut bytes = png(1, 1);
        bytes.extend([0, 0]);
        let good = url("image/png", &bytes);
        assert!(good.ends_with("AAA="));
        assert!(check(MediaKind::Image, &good).is_ok());

        // Encodes to both `+` and `/`, so the URL-safe spelling differs.
        let mut bytes = png(1, 1);
        bytes.extend([0xFB, 0xEF, 0xBE, 0xFF, 0xFF, 0xFF]);
        let encoded = STANDARD.encode(&bytes);
        assert!(encoded.contains('+') && encoded.contains('/'));
        assert!(check(MediaKind::Image, &url("image/png", &bytes)).is_ok());
        let url_safe = format!(
            "data:image/png;base64,{}",
            encoded.replace('+', "-").replace('/', "_")
        );

        let (header, data) = good.split_at(good.find(',').unwrap() + 1);
        let mut bumped_last = data.trim_end_matches('=').to_string();
        let last = bumped_last.pop().unwrap();
        bumped_last.push(char::from(u8::try_from(last).unwrap() + 1));
        bumped_last.push('=');
        let cases = [
            url_safe,
            format!("{header}{}", data.trim_end_matches('=')),
            format!("{good}="),
            format!("{good}===="),
            format!("{header}{bumped_last}"),
            format!("{header} {data}"),
            format!("{header}{}\n{}", &data[..8], &data[8..]),
            format!("{header}{}\r\n", &data[..data.len() - 4]),
            format!("{header}{}\t{}", &data[..4], &data[4..]),
            // Same length as the real data, so only the alphabet can fail it.
            format!("{header}{}    {}", &data[..8], &data[12..]),
            format!("{header}{}\r\n\r\n{}", &data[..8], &data[12..]),
            format!("{header}{}%2B", &data[..data.len() - 3]),
            format!("{header}{}=AA=", &data[..data.len() - 4]),
            format!("{header}={data}"),
        ];
        for content in cases {
            assert_eq!(
                code(MediaKind::Image, &content),
                "invalid_media",
                "{content:?}"
            );
        }
        // The classic non-canonical signature encoding.
        let error = check(MediaKind::Image, "data:image/png;base64,iVBORw0KGgp=").unwrap_err();
        assert!(error.detail().contains("unused bits"), "{}", error.detail());
    }

    #[test]
    fn the_header_is_strict_and_lowercase() {
        let data = STANDARD.encode(png(1, 1));
        for content in [
            format!("DATA:image/png;base64,{data}"),
            format!("Data:image/png;base64,{data}"),
            format!("data:IMAGE/PNG;base64,{data}"),
            format!("data:image/PNG;base64,{data}"),
            format!("data:image/png;BASE64,{data}"),
            format!("data:image/png;charset=utf-8;base64,{data}"),
            format!("data:image/png;name=x.png;base64,{data}"),
            format!("data:image/png;base64;charset=utf-8,{data}"),
            format!("data:image/png,{data}"),
            format!("data:image/png;base64{data}"),
            format!("data: image/png;base64,{data}"),
            format!("data:image/png ;base64,{data}"),
            format!(" data:image/png;base64,{data}"),
            "data:image/png,%89PNG%0D%0A%1A%0A".to_string(),
            "data:image/png;base64,".to_string(),
            "https://example.com/cat.png".to_string(),
            String::new(),
        ] {
            let error = check(MediaKind::Image, &content).unwrap_err();
            assert!(
                matches!(error.code(), "invalid_media" | "media_type_not_allowed"),
                "{content:?}: {error:?}"
            );
        }
        let lowercase = |content: String| check(MediaKind::Image, &content).unwrap_err();
        assert!(
            lowercase(format!("DATA:image/png;base64,{data}"))
                .detail()
                .contains("lowercase")
        );
        assert!(
            lowercase(format!("data:Image/Png;base64,{data}"))
                .detail()
                .contains("lowercase")
        );
        assert!(
            lowercase(format!("data:image/png;Base64,{data}"))
                .detail()
                .contains("lowercase")
        );
        assert_eq!(
            code(MediaKind::Image, &format!("data:image%2Fpng;base64,{data}")),
            "media_type_not_allowed"
        );
        assert_eq!(
            code(MediaKind::Image, "data:image/png;base64,"),
            "invalid_media"
        );
    }

    #[test]
    fn size_is_checked_before_decoding() {
        let limits = MediaLimits {
            max_audio_bytes: 31,
            ..MediaLimits::default()
        };
        let sized = |len: usize| {
            let mut bytes = ogg();
            bytes.resize(len, 0);
            url("audio/ogg", &bytes)
        };
        assert_eq!(
            check_media(MediaKind::Audio, &sized(31), &limits)
                .unwrap()
                .decoded_bytes,
            31
        );
        // 32 bytes take the same 44 characters as 31, so the padding decides.
        let error = check_media(MediaKind::Audio, &sized(32), &limits).unwrap_err();
        assert_eq!(error.code(), "media_too_large");
        assert!(error.is_too_large());
        assert_eq!(
            check_media(MediaKind::Audio, &sized(34), &limits)
                .unwrap_err()
                .code(),
            "media_too_large"
        );
        // Not base64 at all, but too long: the size is what is reported, so the data was
        // never looked at.
        let junk = format!("data:audio/ogg;base64,{}", "!".repeat(45));
        assert_eq!(
            check_media(MediaKind::Audio, &junk, &limits)
                .unwrap_err()
                .code(),
            "media_too_large"
        );
        let junk = format!("not even a data url {}", "!".repeat(100));
        assert_eq!(
            check_media(MediaKind::Audio, &junk, &limits)
                .unwrap_err()
                .code(),
            "media_too_large"
        );
    }

    #[test]
    fn a_hundred_megabytes_is_refused_from_its_length() {
        let prefix = b"data:image/png;base64,";
        let mut bytes = vec![b'A'; 100 << 20];
        bytes[..prefix.len()].copy_from_slice(prefix);
        let content = String::from_utf8(bytes).unwrap();
        let error = check(MediaKind::Image, &content).unwrap_err();
        assert_eq!(error.code(), "media_too_large");
        assert!(error.detail().contains("5242880"), "{}", error.detail());
    }

    #[test]
    fn image_dimensions_are_capped() {
        for (width, height) in [(50_000, 50_000), (16_385, 1), (1, 20_000), (8_000, 8_000)] {
            let error =
                check(MediaKind::Image, &url("image/png", &png(width, height))).unwrap_err();
            assert_eq!(
                error.code(),
                "media_dimensions_too_large",
                "{width}x{height}"
            );
            assert!(!error.is_too_large());
        }
        assert!(check(MediaKind::Image, &url("image/png", &png(16_384, 2_000))).is_ok());
        let error = check(MediaKind::Image, &url("image/gif", &gif(60_000, 60_000))).unwrap_err();
        assert_eq!(error.code(), "media_dimensions_too_large");
        let error = check(MediaKind::Image, &url("image/png", &png(u32::MAX, 1))).unwrap_err();
        assert_eq!(error.code(), "media_dimensions_too_large");
    }

    #[test]
    fn unreadable_image_headers_are_invalid() {
        let truncated_jpeg = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0, 1,
        ];
        for (mime, bytes) in [
            ("image/png", b"\x89PNG\r\n\x1a\n".to_vec()),
            ("image/png", png(0, 10)),
            ("image/jpeg", truncated_jpeg.to_vec()),
            ("image/gif", b"GIF89a".to_vec()),
            ("image/webp", b"RIFF\0\0\0\0WEBPVP8Z".to_vec()),
        ] {
            assert_eq!(
                code(MediaKind::Image, &url(mime, &bytes)),
                "invalid_media",
                "{mime}"
            );
        }
    }

    #[test]
    fn the_largest_message_is_the_longest_allowed_url() {
        let limits = MediaLimits::default();
        let longest = "data:audio/x-wav;base64,".len() + (10_usize << 20).div_ceil(3) * 4;
        assert_eq!(max_encoded_len(&limits), longest);
        let small = MediaLimits {
            max_image_bytes: 300,
            max_audio_bytes: 30,
            ..limits
        };
        assert_eq!(
            max_encoded_len(&small),
            "data:image/jpeg;base64,".len() + 400
        );
        // A URL of exactly that length passes the length gate.
        let mut bytes = png(1, 1);
        bytes.resize(300, 0);
        let content = url("image/jpeg", &bytes);
        assert_eq!(content.len(), max_encoded_len(&small));
        assert_eq!(
            check_media(MediaKind::Image, &content, &small)
                .unwrap_err()
                .code(),
            "media_type_mismatch"
        );
    }

    /// Base64 of the start of a file of each kind, three bytes at a time so random symbols
    /// can follow.
    fn signature_prefix() -> impl Strategy<Value = (MediaKind, &'static str, &'static str)> {
        prop_oneof![
            Just((MediaKind::Audio, "audio/ogg", "T2dnUwAC")),
            Just((MediaKind::Audio, "audio/mpeg", "SUQz")),
            Just((MediaKind::Audio, "audio/aac", "//FQ")),
            Just((MediaKind::Image, "image/png", "iVBORw0KGgoAAAANSUhEUgAA")),
            Just((MediaKind::Image, "image/jpeg", "/9j/")),
            Just((MediaKind::Image, "image/gif", "R0lGODlh")),
        ]
    }

    fn sample() -> impl Strategy<Value = (MediaKind, &'static str, Vec<u8>)> {
        prop_oneof![
            Just((MediaKind::Image, "image/png", png(7, 9))),
            Just((MediaKind::Image, "image/jpeg", jpeg(7, 9))),
            Just((MediaKind::Image, "image/gif", gif(7, 9))),
            Just((MediaKind::Image, "image/webp", webp(7, 9))),
            Just((MediaKind::Audio, "audio/webm", webm())),
            Just((MediaKind::Audio, "audio/wav", wav())),
            Just((MediaKind::Audio, "audio/mp4", m4a())),
        ]
    }

    proptest! {
        #![proptest_config(crate::content::proptest_config(256))]

        #[test]
        fn arbitrary_strings_never_panic(content in any::<String>()) {
            for kind in [MediaKind::Image, MediaKind::Audio] {
                prop_assert!(check(kind, &content).is_err());
                let prefixed = format!("data:{content}");
                let _ = check(kind, &prefixed);
            }
        }

        #[test]
        fn accepted_data_is_canonical(
            (kind, mime, prefix) in signature_prefix(),
            symbols in "[A-Za-z0-9+/]{0,40}",
            padding in "={0,3}",
        ) {
            let data = format!("{prefix}{symbols}{padding}");
            let content = format!("data:{mime};base64,{data}");
            if let Ok(media) = check(kind, &content) {
                let decoded = STANDARD.decode(&data).unwrap();
                prop_assert_eq!(STANDARD.encode(&decoded), data);
                prop_assert_eq!(media.decoded_bytes, decoded.len());
                prop_assert_eq!(media.mime, mime);
            }
        }

        #[test]
        fn mangled_files_never_panic(
            (kind, mime, bytes) in sample(),
            cut in 0usize..64,
            tail in prop::collection::vec(any::<u8>(), 0..64),
            flips in prop::collection::vec((0usize..64, any::<u8>()), 0..4),
        ) {
            let mut bytes = bytes;
            bytes.truncate(cut.max(4));
            bytes.extend(tail);
            for (at, value) in flips {
                if let Some(byte) = bytes.get_mut(at) {
                    *byte = value;
                }
            }
            if let Ok(media) = check(kind, &url(mime, &bytes)) {
                prop_assert_eq!(media.decoded_bytes, bytes.len());
                prop_assert_eq!(media.width.is_some(), kind == MediaKind::Image);
            }
        }
    }
}
