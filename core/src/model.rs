//! The papers' CNN, for any number of classes, input channels and image size.
//!
//! Layers (docs/METHOD.md): conv 12@5x5 stride 2 -> conv 18@3x3 stride 2 ->
//! dropout 0.5 -> conv 24@2x2 -> dense 150 ReLU -> dense `num_classes`
//! (softmax is folded into the loss). Valid padding throughout, so a 28x28
//! input shrinks 28 -> 12 -> 5 -> 4; with 47 classes and one channel this is
//! the papers' 68,873 parameters.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Dropout, DropoutConfig, Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;

/// Shape of the model: what a client and the server must agree on before
/// weights can travel between them.
#[derive(Config, Debug, PartialEq)]
pub struct ModelConfig {
    /// Number of output classes.
    pub num_classes: usize,
    /// Input channels (1 for MNIST-like data, 3 for CIFAR).
    #[config(default = 1)]
    pub channels: usize,
    /// Input height in pixels.
    #[config(default = 28)]
    pub height: usize,
    /// Input width in pixels.
    #[config(default = 28)]
    pub width: usize,
    /// Dropout probability after the second convolution (the papers use 0.5).
    #[config(default = 0.5)]
    pub dropout: f64,
}

/// The papers' CNN.
#[derive(Module, Debug)]
pub struct Cnn {
    conv1: Conv2d,
    conv2: Conv2d,
    dropout: Dropout,
    conv3: Conv2d,
    fc1: Linear,
    fc2: Linear,
}

/// Spatial size after a valid convolution.
fn conv_out(size: usize, kernel: usize, stride: usize) -> usize {
    (size.saturating_sub(kernel)) / stride + 1
}

/// Held while a model's random weights are drawn from burn's process-wide
/// generator, so that seeding it and drawing from it are one step.
fn lock_generator() -> std::sync::MutexGuard<'static, ()> {
    static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    GENERATOR.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads every parameter once, so that burn draws its lazy initial values.
struct Materialise;

impl burn::module::ModuleVisitor for Materialise {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        let _ = param.val();
    }
}

impl ModelConfig {
    /// The papers' CNN sized for `data`: its classes, channels and image size.
    pub fn for_dataset(data: &crate::data::Dataset) -> Self {
        ModelConfig::new(data.num_classes())
            .with_channels(data.channels)
            .with_height(data.height)
            .with_width(data.width)
    }

    /// Side lengths of the last feature map, `[height, width]`.
    pub fn feature_map(&self) -> [usize; 2] {
        self.feature_maps()[2]
    }

    /// Side lengths `[height, width]` of each convolution's output, in
    /// order: conv1, conv2 (where dropout applies), conv3.
    pub fn feature_maps(&self) -> [[usize; 2]; 3] {
        let sizes = |s: usize| {
            let one = conv_out(s, 5, 2);
            let two = conv_out(one, 3, 2);
            [one, two, conv_out(two, 2, 1)]
        };
        let (h, w) = (sizes(self.height), sizes(self.width));
        [[h[0], w[0]], [h[1], w[1]], [h[2], w[2]]]
    }

    /// Values one sample's dropout mask holds: conv2's 18 channels over
    /// its feature map, in `[channel, height, width]` order.
    pub fn dropout_len(&self) -> usize {
        let [h, w] = self.feature_maps()[1];
        18 * h * w
    }

    /// Number of values one input sample holds (`channels * height * width`).
    pub fn sample_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Builds the model with fresh random weights on `device` (burn's
    /// default initialisers: Kaiming uniform), drawn from burn's
    /// process-wide generator (see [`ModelConfig::init_seeded`]).
    pub fn init(&self, device: &Device) -> Cnn {
        let _drawing = lock_generator();
        let model = self.build(device, None);
        model.visit(&mut Materialise);
        model
    }

    /// [`ModelConfig::init`] from burn's generator seeded with `seed` just
    /// before: the same weights for the same seed, whatever else the
    /// process initialises at the same time. burn's generator is one per
    /// process; without the lock, two servers starting in one process (a
    /// test's) interleaved their draws and began from different models.
    pub fn init_seeded(&self, device: &Device, seed: u64) -> Cnn {
        let _drawing = lock_generator();
        device.seed(seed);
        let model = self.build(device, None);
        // burn draws a parameter's values when it is first read, not when
        // it is built: read them all while the generator is ours.
        model.visit(&mut Materialise);
        model
    }

    /// Builds the model with every parameter zero: the shell that weights
    /// are loaded into ([`crate::weights::Weights::to_model`]). It draws no
    /// random numbers, which in a tab were a tenth of a short hop's time
    /// (docs/RESULTS.md, "Training speed").
    pub fn init_zeros(&self, device: &Device) -> Cnn {
        self.build(device, Some(Initializer::Zeros))
    }

    fn build(&self, device: &Device, initializer: Option<Initializer>) -> Cnn {
        let [fh, fw] = self.feature_map();
        let conv = |config: Conv2dConfig| match &initializer {
            Some(init) => config.with_initializer(init.clone()).init(device),
            None => config.init(device),
        };
        let linear = |config: LinearConfig| match &initializer {
            Some(init) => config.with_initializer(init.clone()).init(device),
            None => config.init(device),
        };
        Cnn {
            conv1: conv(Conv2dConfig::new([self.channels, 12], [5, 5]).with_stride([2, 2])),
            conv2: conv(Conv2dConfig::new([12, 18], [3, 3]).with_stride([2, 2])),
            dropout: DropoutConfig::new(self.dropout).init(),
            conv3: conv(Conv2dConfig::new([18, 24], [2, 2])),
            fc1: linear(LinearConfig::new(24 * fh * fw, 150)),
            fc2: linear(LinearConfig::new(150, self.num_classes)),
        }
    }
}

impl Cnn {
    /// Logits for a batch of images.
    ///
    /// # Shapes
    /// - images: `[batch, channels, height, width]`
    /// - output: `[batch, num_classes]`
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = relu(self.conv1.forward(images)); // [b, 12, 12, 12]
        let x = relu(self.conv2.forward(x)); // [b, 18, 5, 5]
        let x = self.dropout.forward(x);
        self.head(x)
    }

    /// Logits for a training batch, with dropout given as a mask rather
    /// than drawn from burn's process-wide generator: training draws its
    /// masks from the visit's own seed ([`crate::train::dropout_keep`]),
    /// so a visit trains the same whatever else runs beside it, and the
    /// batched trainer ([`crate::batched`]) can draw the very same masks.
    ///
    /// # Shapes
    /// - images: `[batch, channels, height, width]`
    /// - keep: `[batch, 18, h2, w2]` (conv2's output), each value 0 or
    ///   `1 / (1 - dropout)`
    /// - output: `[batch, num_classes]`
    pub fn forward_masked(&self, images: Tensor<4>, keep: Tensor<4>) -> Tensor<2> {
        let x = relu(self.conv1.forward(images));
        let x = relu(self.conv2.forward(x)) * keep;
        self.head(x)
    }

    /// conv3, flatten and the dense layers.
    fn head(&self, x: Tensor<4>) -> Tensor<2> {
        let x = relu(self.conv3.forward(x)); // [b, 24, 4, 4]
        let [b, c, h, w] = x.dims();
        let x = x.reshape([b, c * h * w]); // [b, 384]
        let x = relu(self.fc1.forward(x)); // [b, 150]
        self.fc2.forward(x) // [b, num_classes]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn papers_cnn_has_68873_parameters_for_47_classes() {
        // Prepare
        let device = Device::flex();
        let config = ModelConfig::new(47);

        // Execute
        let model = config.init(&device);

        // Assert
        assert_eq!(config.feature_map(), [4, 4]);
        assert_eq!(model.num_params(), 68_873);
    }

    #[test]
    fn forward_gives_one_logit_per_class_for_colour_images() {
        let device = Device::flex();
        let config = ModelConfig::new(10)
            .with_channels(3)
            .with_height(32)
            .with_width(32);
        let model = config.init(&device);

        let logits = model.forward(Tensor::zeros([2, 3, 32, 32], &device));

        assert_eq!(config.feature_map(), [5, 5]);
        assert_eq!(logits.dims(), [2, 10]);
    }

    #[test]
    fn the_zero_shell_has_the_random_models_shapes_and_only_zeros() {
        let device = Device::flex();
        let config = ModelConfig::new(10);

        let random = crate::weights::Weights::from_model(&config.init(&device));
        let shell = crate::weights::Weights::from_model(&config.init_zeros(&device));

        assert_eq!(shell.shapes, random.shapes);
        assert!(shell.values.iter().all(|&v| v == 0.0));
        assert!(random.values.iter().any(|&v| v != 0.0));
    }

    #[test]
    fn a_seeded_model_is_the_same_whatever_else_draws_at_the_same_time() {
        // Prepare: the model seed 7 gives alone.
        let config = ModelConfig::new(10);
        let device = Device::flex();
        let alone = crate::weights::Weights::from_model(&config.init_seeded(&device, 7));

        // Execute: seeded inits on one thread while another draws unseeded
        // models (the bug: two servers starting in one test process began
        // from different models for the same seed).
        let done = std::sync::atomic::AtomicBool::new(false);
        let seeded = std::thread::scope(|scope| {
            scope.spawn(|| {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    config.init(&Device::flex());
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            });
            let seeded: Vec<_> = (0..30)
                .map(|_| {
                    let model = config.init_seeded(&Device::flex(), 7);
                    crate::weights::Weights::from_model(&model)
                })
                .collect();
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            seeded
        });

        // Assert
        assert!(seeded.iter().all(|w| w.values == alone.values));
    }
}
