//! Client-side data augmentation and downsampling: random affine transforms of images and the
//! application of Astraea's per-class plan `R[y]` to a client's own samples (docs/METHOD.md step 4).
//!
//! Images are `&[f32]` of `channels * height * width` values, channel-major, pixels in [0, 1].
//! Transforms map each output pixel back into the input about the image centre and sample it
//! bilinearly, with zero (black) outside the input; outputs are clamped to [0, 1]. All randomness
//! is seeded.

use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

mod plan;

pub use plan::{AugmentError, PlanOutcome, apply_plan, materialise};

/// Ranges of the random transforms. The papers name the transforms (shift, rotation, shear, zoom)
/// but give no ranges; these defaults are this project's, mild enough that a digit or letter stays
/// recognisable.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AugmentConfig {
    /// Largest shift along each axis, in pixels (default 2.0).
    pub max_shift_px: f32,
    /// Largest rotation either way, in degrees (default 15.0).
    pub max_rotation_deg: f32,
    /// Largest horizontal shear factor either way (default 0.2).
    pub max_shear: f32,
    /// Smallest zoom factor (default 0.9; below 1 shrinks the content).
    pub zoom_min: f32,
    /// Largest zoom factor (default 1.1; above 1 enlarges the content).
    pub zoom_max: f32,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            max_shift_px: 2.0,
            max_rotation_deg: 15.0,
            max_shear: 0.2,
            zoom_min: 0.9,
            zoom_max: 1.1,
        }
    }
}

/// One affine transform of an image about its centre, with x to the right and y downwards.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Transform {
    /// Moves the content `dx` pixels right and `dy` pixels down.
    Shift {
        /// Rightward shift in pixels.
        dx: f32,
        /// Downward shift in pixels.
        dy: f32,
    },
    /// Turns the content counter-clockwise as seen on screen by `radians`.
    Rotate {
        /// Angle; positive is counter-clockwise on screen.
        radians: f32,
    },
    /// Shears horizontally: a point `v` pixels below the centre moves `s * v` pixels right.
    Shear {
        /// Shear factor.
        s: f32,
    },
    /// Scales the content by `factor` about the centre (above 1 enlarges).
    Zoom {
        /// Scale factor; must be positive.
        factor: f32,
    },
}

/// `lo + (hi - lo) * u` with u uniform in [0, 1): a uniform draw that, unlike `random_range`,
/// also accepts an empty or reversed range from a hand-written config.
fn uniform(rng: &mut StdRng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.random::<f32>()
}

impl Transform {
    /// A random transform: one of the four kinds with equal probability, then its parameter
    /// uniform in the configured range (for a shift, dx and dy each in +-`max_shift_px`).
    pub fn random(config: &AugmentConfig, rng: &mut StdRng) -> Self {
        match rng.random_range(0..4) {
            0 => Self::Shift {
                dx: uniform(rng, -config.max_shift_px, config.max_shift_px),
                dy: uniform(rng, -config.max_shift_px, config.max_shift_px),
            },
            1 => {
                let degrees = uniform(rng, -config.max_rotation_deg, config.max_rotation_deg);
                Self::Rotate {
                    radians: degrees.to_radians(),
                }
            }
            2 => Self::Shear {
                s: uniform(rng, -config.max_shear, config.max_shear),
            },
            _ => Self::Zoom {
                factor: uniform(rng, config.zoom_min, config.zoom_max),
            },
        }
    }

    /// Where the content shown at offset `(u, v)` from the centre of the output comes from in the
    /// input, as an offset from the input's centre (the inverse of the transform).
    fn source(&self, u: f32, v: f32) -> (f32, f32) {
        match *self {
            Self::Shift { dx, dy } => (u - dx, v - dy),
            Self::Rotate { radians } => {
                let (sin, cos) = radians.sin_cos();
                (u * cos - v * sin, u * sin + v * cos)
            }
            Self::Shear { s } => (u - s * v, v),
            Self::Zoom { factor } => (u / factor, v / factor),
        }
    }

    /// The transformed image, same shape as `image`.
    ///
    /// Each output pixel is mapped back into the input about the centre and sampled bilinearly;
    /// points outside the input read as 0. Source coordinates within 1e-4 of a whole pixel are
    /// snapped to it, so whole-pixel shifts and quarter turns copy pixels exactly instead of
    /// blurring them by float rounding. The result is clamped to [0, 1].
    ///
    /// # Panics
    /// If `image.len() != channels * height * width`.
    pub fn apply(&self, image: &[f32], channels: usize, height: usize, width: usize) -> Vec<f32> {
        let plane = height * width;
        assert_eq!(
            image.len(),
            channels * plane,
            "image has {} floats, expected {channels}x{height}x{width}",
            image.len()
        );
        let (cx, cy) = ((width as f32 - 1.0) / 2.0, (height as f32 - 1.0) / 2.0);
        let mut out = vec![0.0; image.len()];
        for y in 0..height {
            for x in 0..width {
                let (u, v) = self.source(x as f32 - cx, y as f32 - cy);
                let taps = bilinear_taps(snap(u + cx), snap(v + cy), width, height);
                for c in 0..channels {
                    let input = &image[c * plane..(c + 1) * plane];
                    let value: f32 = taps.iter().flatten().map(|&(i, w)| w * input[i]).sum();
                    out[c * plane + y * width + x] = value.clamp(0.0, 1.0);
                }
            }
        }
        out
    }
}

/// `x` rounded to a whole number when it is within 1e-4 of one.
fn snap(x: f32) -> f32 {
    let r = x.round();
    if (x - r).abs() < 1e-4 { r } else { x }
}

/// The up to four (flat index, weight) pairs of bilinear sampling at `(x, y)`; neighbours outside
/// the image are `None` and so contribute zero.
fn bilinear_taps(x: f32, y: f32, width: usize, height: usize) -> [Option<(usize, f32)>; 4] {
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let tap = |xi: f32, yi: f32, w: f32| {
        let inside = xi >= 0.0 && yi >= 0.0 && xi < width as f32 && yi < height as f32 && w > 0.0;
        inside.then(|| (yi as usize * width + xi as usize, w))
    };
    [
        tap(x0, y0, (1.0 - fx) * (1.0 - fy)),
        tap(x0 + 1.0, y0, fx * (1.0 - fy)),
        tap(x0, y0 + 1.0, (1.0 - fx) * fy),
        tap(x0 + 1.0, y0 + 1.0, fx * fy),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A 5x5 single-channel image, black except one bright pixel at (row, col).
    fn dot(row: usize, col: usize) -> Vec<f32> {
        let mut image = vec![0.0; 25];
        image[row * 5 + col] = 1.0;
        image
    }

    #[test]
    fn identity_parameters_return_the_image_unchanged() {
        // Prepare
        let image: Vec<f32> = (0..2 * 4 * 6).map(|i| (i % 7) as f32 / 7.0).collect();
        for transform in [
            Transform::Shift { dx: 0.0, dy: 0.0 },
            Transform::Zoom { factor: 1.0 },
        ] {
            // Execute
            let out = transform.apply(&image, 2, 4, 6);
            // Assert
            assert_eq!(out, image, "{transform:?}");
        }
    }

    #[test]
    fn shift_by_one_pixel_moves_a_bright_pixel_by_one() {
        // Prepare
        let image = dot(2, 2);
        // Execute
        let right = Transform::Shift { dx: 1.0, dy: 0.0 }.apply(&image, 1, 5, 5);
        let up = Transform::Shift { dx: 0.0, dy: -1.0 }.apply(&image, 1, 5, 5);
        // Assert
        assert_eq!(right, dot(2, 3));
        assert_eq!(up, dot(1, 2));
    }

    #[test]
    fn quarter_turn_matches_hand_computed_result() {
        // Prepare: counter-clockwise on screen, out[r][c] = in[c][2 - r].
        let image = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];
        let expected = [0.3, 0.6, 0.9, 0.2, 0.5, 0.8, 0.1, 0.4, 0.7];
        // Execute
        let out = Transform::Rotate {
            radians: std::f32::consts::FRAC_PI_2,
        }
        .apply(&image, 1, 3, 3);
        // Assert
        assert_eq!(out, expected);
    }

    #[test]
    fn half_pixel_shift_splits_a_pixel_bilinearly() {
        // Prepare
        let image = dot(2, 2);
        // Execute
        let out = Transform::Shift { dx: 0.5, dy: 0.0 }.apply(&image, 1, 5, 5);
        // Assert
        let mut expected = vec![0.0; 25];
        expected[12] = 0.5;
        expected[13] = 0.5;
        assert_eq!(out, expected);
    }

    #[test]
    fn random_transforms_keep_shape_and_pixel_range() {
        // Prepare
        let config = AugmentConfig {
            max_shear: 0.5,
            zoom_max: 1.5,
            ..AugmentConfig::default()
        };
        let mut rng = StdRng::seed_from_u64(9);
        let image: Vec<f32> = (0..3 * 8 * 8)
            .map(|i| ((i * 37) % 101) as f32 / 100.0)
            .collect();
        let mut kinds = [0; 4];
        for _ in 0..200 {
            // Execute
            let transform = Transform::random(&config, &mut rng);
            let out = transform.apply(&image, 3, 8, 8);
            // Assert
            assert_eq!(out.len(), image.len());
            assert!(out.iter().all(|p| (0.0..=1.0).contains(p)), "{transform:?}");
            let kind = match transform {
                Transform::Shift { dx, dy } => (dx.abs() <= 2.0 && dy.abs() <= 2.0).then_some(0),
                Transform::Rotate { radians } => (radians.abs() <= 15f32.to_radians()).then_some(1),
                Transform::Shear { s } => (s.abs() <= 0.5).then_some(2),
                Transform::Zoom { factor } => (0.9..=1.5).contains(&factor).then_some(3),
            };
            kinds[kind.expect("parameter out of range")] += 1;
        }
        assert!(kinds.iter().all(|&n| n > 30), "{kinds:?}");
    }
}
