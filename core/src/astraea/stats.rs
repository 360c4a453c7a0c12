//! Global label statistics (docs/METHOD.md step 2): C, mu, sigma and z-scores.

/// The federation's global class distribution, as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalStats {
    /// C: samples per class summed over the clients.
    pub counts: Vec<f64>,
    /// mu: the mean of C over classes.
    pub mean: f64,
    /// sigma: the population standard deviation of C.
    pub std: f64,
    /// Z_y = (C_y - mu) / sigma, all 0 when sigma is 0 (a balanced federation).
    pub z: Vec<f64>,
}

impl GlobalStats {
    /// Sums the clients' label-count vectors and derives the z-scores.
    ///
    /// Every vector must have the same length, the number of classes.
    pub fn from_client_counts(client_counts: &[Vec<usize>]) -> Self {
        let num_classes = client_counts.first().map_or(0, Vec::len);
        let mut counts = vec![0.0; num_classes];
        for client in client_counts {
            for (total, &n) in counts.iter_mut().zip(client) {
                *total += n as f64;
            }
        }
        Self::from_counts(counts)
    }

    /// Derives mean, population std and z-scores from global counts.
    pub fn from_counts(counts: Vec<f64>) -> Self {
        let n = counts.len().max(1) as f64;
        let mean = counts.iter().sum::<f64>() / n;
        let var = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / n;
        let std = var.sqrt();
        let z = counts
            .iter()
            .map(|c| if std > 0.0 { (c - mean) / std } else { 0.0 })
            .collect();
        Self {
            counts,
            mean,
            std,
            z,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_match_values_worked_by_hand() {
        // Prepare: two clients, three classes; C = [10, 20, 60].
        let clients = vec![vec![4, 20, 0], vec![6, 0, 60]];

        // Execute
        let stats = GlobalStats::from_client_counts(&clients);

        // Assert: mu = 30; sigma = sqrt((400 + 100 + 900) / 3) = sqrt(466.67) = 21.602.
        assert_eq!(stats.counts, vec![10.0, 20.0, 60.0]);
        assert!((stats.mean - 30.0).abs() < 1e-12);
        assert!((stats.std - 21.602_468_994_692_867).abs() < 1e-9);
        let expected = [-0.925_820_1, -0.462_910_05, 1.388_730_15];
        for (z, e) in stats.z.iter().zip(expected) {
            assert!((z - e).abs() < 1e-6, "{z} vs {e}");
        }
    }

    #[test]
    fn a_balanced_federation_has_zero_z_scores() {
        let stats = GlobalStats::from_client_counts(&[vec![5, 5], vec![5, 5]]);
        assert_eq!(stats.std, 0.0);
        assert_eq!(stats.z, vec![0.0, 0.0]);
    }
}
