//! Attacks a hostile client can mount, as plain functions over what it
//! trains on and what it sends, so the simulator and the native swarm run
//! the same ones and anyone can reproduce the robustness figures.
//!
//! Names follow the Byzantine-robust FL literature: sign flipping and
//! scaling (Baruch et al. 2019; Bhagoji et al. 2019 call scaling "explicit
//! boosting"), Gaussian noise (Blanchard et al. 2017), label flipping
//! (Biggio et al. 2012; Fang et al. 2020), and inflated sample counts (the
//! attack on FedAvg's sample weighting).

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

/// One kind of attack with its strength.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Attack {
    /// Sends `w_sent - scale * (w_trained - w_sent)`: the honest update
    /// reversed and amplified.
    SignFlip {
        /// How much the reversed update is amplified (default 4).
        scale: f32,
    },
    /// Sends `w_sent + factor * (w_trained - w_sent)`: the honest update
    /// boosted.
    Scale {
        /// The boost (default 10).
        factor: f32,
    },
    /// Sends `w_sent + N(0, std^2)` per weight, without training.
    Noise {
        /// Standard deviation of the noise (default 0.5).
        std: f32,
    },
    /// Trains on labels mapped `y -> classes - 1 - y`, then sends honestly.
    LabelFlip,
    /// Trains honestly but claims `factor` times its samples.
    InflateSamples {
        /// The claimed multiple (default 1000).
        factor: u64,
    },
}

impl Attack {
    /// Every kind with its default strength, in the order tables list them.
    pub const ALL: [Attack; 5] = [
        Attack::SignFlip { scale: 4.0 },
        Attack::Scale { factor: 10.0 },
        Attack::Noise { std: 0.5 },
        Attack::LabelFlip,
        Attack::InflateSamples { factor: 1000 },
    ];

    /// The kind's name on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Attack::SignFlip { .. } => "sign-flip",
            Attack::Scale { .. } => "scale",
            Attack::Noise { .. } => "noise",
            Attack::LabelFlip => "label-flip",
            Attack::InflateSamples { .. } => "inflate-samples",
        }
    }

    /// Labels the attacker trains on: flipped for [`Attack::LabelFlip`],
    /// unchanged otherwise.
    pub fn poison_labels(&self, labels: &mut [u32], classes: usize) {
        if let Attack::LabelFlip = self {
            let top = classes.saturating_sub(1) as u32;
            labels.iter_mut().for_each(|l| *l = top.saturating_sub(*l));
        }
    }

    /// Whether the attacker trains at all before it answers.
    pub fn trains(&self) -> bool {
        !matches!(self, Attack::Noise { .. })
    }

    /// Turns the weights it trained (`trained`, from `sent`) into the
    /// weights it sends.
    ///
    /// # Shapes
    /// `sent` and `trained` have the model's parameter count.
    pub fn poison_weights(&self, sent: &[f32], trained: &mut [f32], rng: &mut impl Rng) {
        match *self {
            Attack::SignFlip { scale } => trained
                .iter_mut()
                .zip(sent)
                .for_each(|(w, s)| *w = s - scale * (*w - s)),
            Attack::Scale { factor } => trained
                .iter_mut()
                .zip(sent)
                .for_each(|(w, s)| *w = s + factor * (*w - s)),
            Attack::Noise { std } => {
                // A non-finite std (never parsed, but constructible) sends
                // the weights back unchanged.
                let normal = Normal::new(0.0f32, std.abs()).ok();
                trained.iter_mut().zip(sent).for_each(|(w, s)| {
                    *w = s + normal.map_or(0.0, |n| n.sample(rng));
                });
            }
            Attack::LabelFlip | Attack::InflateSamples { .. } => {}
        }
    }

    /// The sample count it claims for `samples` real ones.
    pub fn claimed_samples(&self, samples: u64) -> u64 {
        match *self {
            Attack::InflateSamples { factor } => samples.saturating_mul(factor),
            _ => samples,
        }
    }
}

impl fmt::Display for Attack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attack::SignFlip { scale } => write!(f, "sign-flip:{scale}"),
            Attack::Scale { factor } => write!(f, "scale:{factor}"),
            Attack::Noise { std } => write!(f, "noise:{std}"),
            Attack::LabelFlip => write!(f, "label-flip"),
            Attack::InflateSamples { factor } => write!(f, "inflate-samples:{factor}"),
        }
    }
}

impl FromStr for Attack {
    type Err = String;

    /// `sign-flip[:SCALE]`, `scale[:FACTOR]`, `noise[:STD]`, `label-flip`,
    /// `inflate-samples[:FACTOR]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, value) = match s.split_once(':') {
            Some((n, v)) => (n, Some(v)),
            None => (s, None),
        };
        let number = |default: f32| -> Result<f32, String> {
            match value {
                None => Ok(default),
                Some(v) => v
                    .parse::<f32>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| format!("{name} takes a finite number >= 0, got {v:?}")),
            }
        };
        match name {
            "sign-flip" => Ok(Attack::SignFlip {
                scale: number(4.0)?,
            }),
            "scale" => Ok(Attack::Scale {
                factor: number(10.0)?,
            }),
            "noise" => Ok(Attack::Noise { std: number(0.5)? }),
            "label-flip" if value.is_none() => Ok(Attack::LabelFlip),
            "inflate-samples" => match value {
                None => Ok(Attack::InflateSamples { factor: 1000 }),
                Some(v) => v
                    .parse()
                    .map(|factor| Attack::InflateSamples { factor })
                    .map_err(|_| format!("inflate-samples takes a whole number, got {v:?}")),
            },
            _ => Err(format!(
                "unknown attack {s:?}, expected sign-flip[:SCALE], scale[:FACTOR], noise[:STD], \
                 label-flip or inflate-samples[:FACTOR]"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn weight_attacks_reverse_boost_or_replace_the_update() {
        // Prepare: an honest update of +1 on every weight.
        let sent = vec![1.0f32; 4];
        let trained = vec![2.0f32; 4];
        let mut rng = StdRng::seed_from_u64(1);

        // Execute
        let mut flipped = trained.clone();
        Attack::SignFlip { scale: 4.0 }.poison_weights(&sent, &mut flipped, &mut rng);
        let mut boosted = trained.clone();
        Attack::Scale { factor: 10.0 }.poison_weights(&sent, &mut boosted, &mut rng);
        let mut noisy = trained.clone();
        Attack::Noise { std: 0.5 }.poison_weights(&sent, &mut noisy, &mut rng);
        let mut honest = trained.clone();
        Attack::LabelFlip.poison_weights(&sent, &mut honest, &mut rng);

        // Assert
        assert_eq!(flipped, vec![-3.0; 4]);
        assert_eq!(boosted, vec![11.0; 4]);
        assert!(noisy.iter().all(|w| (w - 1.0).abs() < 3.0) && noisy != sent);
        assert_eq!(honest, trained);
    }

    #[test]
    fn label_flip_mirrors_labels_and_inflation_multiplies_samples() {
        let mut labels = vec![0, 3, 9];
        Attack::LabelFlip.poison_labels(&mut labels, 10);
        assert_eq!(labels, vec![9, 6, 0]);
        let mut untouched = vec![0, 3];
        Attack::SignFlip { scale: 1.0 }.poison_labels(&mut untouched, 10);
        assert_eq!(untouched, vec![0, 3]);
        assert_eq!(
            Attack::InflateSamples { factor: 1000 }.claimed_samples(50),
            50_000
        );
        assert_eq!(
            Attack::InflateSamples { factor: 1000 }.claimed_samples(u64::MAX),
            u64::MAX
        );
        assert_eq!(Attack::LabelFlip.claimed_samples(50), 50);
    }

    #[test]
    fn every_attack_parses_back_from_its_name() {
        for attack in Attack::ALL {
            assert_eq!(attack.to_string().parse::<Attack>(), Ok(attack));
            assert_eq!(attack.name().parse::<Attack>(), Ok(attack));
        }
        assert!("teleport".parse::<Attack>().is_err());
        assert!("noise:-1".parse::<Attack>().is_err());
        assert!("label-flip:3".parse::<Attack>().is_err());
    }
}
