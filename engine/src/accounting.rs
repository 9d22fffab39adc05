//! A run's privacy accounting, in one place: what the round engine ([`crate::engine`]) asks
//! before a round opens, what it spends when a round is charged, released or committed, and
//! what it states as the run's ε.
//!
//! [`RunAccounting`] owns
//! - the **budget** (ε, δ) and the release it is charged with (the manifest's round release at
//!   the sampling rate of the audience the budget binds);
//! - the **audiences**: one RDP accountant per tracked audience
//!   ([`crate::ledger::tracked_audiences`]), whose ε the ledger states after every round;
//! - the **participation history**: each device's last release index and count, against the
//!   manifest's `[participation]` limits;
//! - **DP-FTRL**'s tree, its accountant and its segments (a restart starts a new segment);
//! - **adaptive clipping**'s quantile clipper, and with it the round's **clip norm C**: the
//!   engine reads C only from [`RunAccounting::clip_norm`];
//! - **distributed mode**'s accounting: the distributed discrete Gaussian's RDP curve and its
//!   composition under the participation cap.
//!
//! It is rebuilt from what the ledger recorded ([`RunAccounting::restore`], with the counts
//! [`LedgerSpend::from_entries`] reads off the run's entries), checks a round before it opens
//! ([`RunAccounting::check_next_round`]), and commits plain and distributed rounds through one
//! method ([`RunAccounting::commit`]). It does no IO.

use std::collections::HashMap;

use fedpref_privacy::adaptive_clip::{QuantileClipConfig, QuantileClipper};
use fedpref_privacy::pld::RepeatedReleases;
use fedpref_privacy::tree::{ParticipationLimits, TreeAccountant, epsilon_from_zcdp_gaussian};
use fedpref_privacy::{
    Accountant, Audience, Budget, ClippedSum, GaussianSampler, OrderGrid, PrivacyError,
    RdpAccountant, RoundRelease,
};

use crate::aggregation::{FtrlTree, ServerState, TreeProgress};
use crate::distributed::DistributedPlan;
use crate::ledger::{
    AudienceEpsilon, AudienceRdp, DistributedRound, LedgerEntry, LedgerEvent, TreeRound,
    round_increments, tracked_audiences, tree_rho,
};
use crate::manifest::{ManifestPrivacyMode, RunManifest};

/// Distributed mode's accounting: the mechanism every round uses, its RDP curve and the run's
/// composition of it.
struct DistributedAccounting {
    plan: DistributedPlan,
    curve: Vec<f64>,
    accountant: RdpAccountant,
    /// `[participation] max_participations`: no device's data is in more than this many
    /// released sums (the engine hands out no task past it, and every round runs the same
    /// mechanism), so the worst-case device's RDP is this many rounds' and the accountant
    /// composes no more. `None`: every round may hold the same device.
    max_participations: Option<u64>,
    /// Rounds composed into `accountant` (at most `max_participations`).
    composed: u64,
}

impl DistributedAccounting {
    fn epsilon_of(accountant: &RdpAccountant, delta: f64) -> f64 {
        accountant
            .epsilon(delta)
            .map(|e| e.epsilon)
            .unwrap_or(f64::INFINITY)
    }

    /// Whether one more released round adds to the worst-case device's RDP: always, unless
    /// the participation limit has been composed already.
    fn next_round_counts(&self) -> bool {
        self.max_participations.is_none_or(|k| self.composed < k)
    }

    /// The accountant after one more released round, `None` if composing failed.
    fn after_one_more(&self) -> Option<RdpAccountant> {
        let mut next = self.accountant.clone();
        if self.next_round_counts() {
            next.compose_rdp(&self.curve, 1).ok()?;
        }
        Some(next)
    }

    /// Adopts `next` (from [`Self::after_one_more`]) as the accountant.
    fn adopt(&mut self, next: RdpAccountant) {
        if self.next_round_counts() {
            self.composed += 1;
        }
        self.accountant = next;
    }

    /// ε after one more round.
    fn next_epsilon(&self, delta: f64) -> f64 {
        match self.after_one_more() {
            Some(next) => Self::epsilon_of(&next, delta),
            None => f64::INFINITY,
        }
    }

    /// The increment every released round records.
    fn increments(&self) -> Vec<AudienceRdp> {
        vec![AudienceRdp {
            audience: Audience::ReleaseObservers.as_str().to_string(),
            sampling_rate: 1.0,
            rdp: self.curve.clone(),
        }]
    }
}

/// dp-ftrl's state: the tree accountant, the segments and the current segment's tree.
struct TreeState {
    accountant: TreeAccountant,
    /// Finished segments' rounds, then the current segment's.
    progress: TreeProgress,
    /// The current segment's tree (created when the segment starts), or why it could not be.
    tree: Result<FtrlTree, String>,
    /// Cumulative ε after the committed rounds.
    epsilon: f64,
}

impl TreeState {
    fn segments_with(&self, extra: u64) -> Vec<u64> {
        let mut v = self.progress.finished_segments.clone();
        v.push(self.progress.current_segment + extra);
        v
    }
}

/// A device's committed participations: the last release index and how many.
#[derive(Clone, Copy, Debug, Default)]
struct Participation {
    last: Option<u64>,
    count: u64,
}

/// Why the participation limits refuse a device a task in a release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitRefusal {
    /// The release index from which the device may take part again (`None`: never again).
    pub next_allowed: Option<u64>,
    /// The device's participations so far.
    pub count: u64,
    /// The limits' minimum separation, in releases.
    pub min_separation: u64,
}

/// What a round's release spends when the round commits.
pub(crate) enum CommitSpend {
    /// A plain round (modes none, local, central): charged already when its first update
    /// arrived (local mode) or spent now; with adaptive clipping, the bits it releases.
    Plain {
        /// Whether a `round_charged` entry spent the round's release already.
        charged: bool,
        /// Central adaptive clipping: the coordinator's centred clip bits of the updates.
        bits: Option<ClippedSum>,
        /// Local adaptive clipping: the sum of the devices' centred noised bits.
        device_bits: Option<f64>,
    },
    /// A distributed round, whose release was spent when it was recorded
    /// ([`RunAccounting::release_distributed`]).
    Distributed(Box<DistributedRound>),
}

/// What a committed round's ledger entry records about its spend.
pub(crate) struct CommittedSpend {
    /// The RDP spent this round, per audience.
    pub rdp_increments: Vec<AudienceRdp>,
    /// dp-ftrl: the tree accounting of the round.
    pub tree: Option<TreeRound>,
    /// Adaptive clipping: the C the next round uses.
    pub next_clip_norm: Option<f64>,
    /// The assumption the run's ε rests on, when the entry names it.
    pub epsilon_assumption: Option<String>,
    /// Distributed mode: the mechanism behind the increments.
    pub distributed: Option<Box<DistributedRound>>,
}

/// The budget of a run of per-round releases.
enum PlainBudget {
    /// RDP: the privacy crate's budget, charged with the budget release each round.
    Rdp(Budget),
    /// PLD: ε is PLD's of the releases so far at the budget release's sampling rate.
    Pld {
        /// The budget release's sampling rate.
        sampling_rate: f64,
    },
}

/// A run's privacy accounting (see the module docs).
pub struct RunAccounting {
    budget_epsilon: f64,
    delta: f64,
    /// The manifest's sentence naming the assumption the run's ε rests on.
    assumption: String,
    bit_noise_std: Option<f64>,
    manifest_clip_norm: f64,
    local_mode: bool,
    /// The model's number of parameters (a new DP-FTRL tree's dimension).
    dimension: usize,
    release: Option<RoundRelease>,
    /// The release the budget is charged with: `release` at the sampling rate of the audience
    /// the budget binds ([`RunManifest::budget_release`]).
    budget_release: Option<RoundRelease>,
    orders: OrderGrid,
    /// The accountant of the per-round releases (the manifest's).
    accountant: Accountant,
    budget: Option<PlainBudget>,
    /// One RDP accountant per tracked audience (RDP's ε, and the ledger's increments).
    cumulative: Vec<(Audience, RdpAccountant)>,
    /// Per-round releases composed so far (committed rounds and local charges).
    releases: u64,
    /// The PLD accountant of `releases` identical releases, per audience's sampling rate.
    pld: RepeatedReleases,
    /// With PLD: the cumulative ε per audience after `releases` (PLD's composition is not a
    /// running sum, so the statement is kept rather than recomputed).
    stated: Vec<AudienceEpsilon>,
    limits: Option<ParticipationLimits>,
    participation: HashMap<String, Participation>,
    tree: Option<TreeState>,
    clipper: Option<QuantileClipper>,
    distributed: Option<DistributedAccounting>,
    /// Whether what was restored does not fit the budget (the run must not go on).
    overspent: bool,
}

impl RunAccounting {
    /// The accounting of a run that has committed `rounds_committed` rounds and charged
    /// `uncommitted_charges` more (local rounds charged, then abandoned or cut short), as its
    /// ledger records them: the budget and every audience's accountant spend the manifest's
    /// release once per round. `server_state` is the stored optimiser state: it holds adaptive
    /// clipping's current C and DP-FTRL's segments, and a new segment is started in it (the
    /// previous process's tree is gone). `dimension` is the model's number of parameters.
    pub fn restore(
        manifest: &RunManifest,
        rounds_committed: u64,
        uncommitted_charges: u64,
        server_state: &mut ServerState,
        dimension: usize,
    ) -> Self {
        let orders = OrderGrid::default();
        let release = manifest.round_release();
        let budget_release = manifest.budget_release();
        // The budget, the ledger's cumulative ε and `ledger verify` use the run's accountant,
        // so all three agree.
        let accountant = manifest.accountant();
        let mut budget = release.map(|_| match accountant {
            Accountant::Rdp => PlainBudget::Rdp(
                Budget::with_accountant(
                    manifest.budget.epsilon,
                    manifest.budget.delta,
                    orders.clone(),
                    Accountant::Rdp,
                )
                .expect("the manifest's budget is validated"),
            ),
            Accountant::Pld => PlainBudget::Pld {
                sampling_rate: budget_release.map_or(1.0, |r| r.sampling_rate),
            },
        });
        let mut cumulative: Vec<(Audience, RdpAccountant)> = release
            .map(|r| {
                tracked_audiences(&r)
                    .into_iter()
                    .map(|(a, _)| (a, RdpAccountant::new(orders.clone())))
                    .collect()
            })
            .unwrap_or_default();
        let mut overspent = false;
        let mut releases = 0;
        if let (Some(release), Some(budget)) = (release, budget.as_mut()) {
            let increments = round_increments(&release, &orders);
            releases = rounds_committed + uncommitted_charges;
            for _ in 0..releases {
                // Restoring what was already spent. Each round fitted the budget when it was
                // committed; if replaying one does not (the manifest was altered), the run
                // must not go on, or it could spend past its budget.
                if let PlainBudget::Rdp(budget) = budget
                    && budget
                        .spend(&budget_release.expect("set with release"))
                        .is_err()
                {
                    overspent = true;
                }
                for ((_, acc), inc) in cumulative.iter_mut().zip(&increments) {
                    acc.compose_rdp(&inc.rdp, 1).expect("same grid");
                }
            }
        }
        // Both are validated with the manifest; failing here silently would mean unaccounted
        // or unadapted noise, so an impossible failure is a loud one.
        let clipper = manifest.adaptive_clipping.map(|a| {
            QuantileClipper::new(QuantileClipConfig {
                // A stored C outside the bounds (written before they existed) is brought in.
                initial_clip_norm: server_state
                    .clip_norm()
                    .filter(|c| c.is_finite() && *c > 0.0)
                    .unwrap_or(manifest.clip_norm),
                target_quantile: a.target_quantile,
                learning_rate: a.learning_rate,
                bit_noise_std: manifest
                    .bit_noise_std()
                    .expect("adaptive clipping has σ_b (validated with the manifest)"),
                expected_contributions: manifest.sampling.expected_cohort_size(),
            })
            .and_then(|c| {
                let (lo, hi) = manifest
                    .clip_norm_bounds()
                    .expect("adaptive clipping has bounds");
                c.with_bounds(lo, hi)
            })
            .expect("adaptive clipping settings are validated with the manifest")
        });
        let tree_accountant = manifest.server_optimizer.is_tree().then(|| {
            manifest
                .tree_accountant()
                .expect("dp-ftrl has σ, a schedule and participation limits (validated)")
        });
        let tree = tree_accountant.map(|accountant| {
            // A new process: the previous segment's tree is gone, so a new segment starts.
            let mut tree_progress = server_state.tree_progress().cloned().unwrap_or_default();
            // Committed rounds the stored segments do not account for (a state written
            // without them) are charged as one finished segment, never dropped.
            let accounted: u64 =
                tree_progress.finished_segments.iter().sum::<u64>() + tree_progress.current_segment;
            if rounds_committed > accounted {
                tree_progress
                    .finished_segments
                    .push(rounds_committed - accounted);
            }
            if tree_progress.current_segment > 0 {
                let finished = tree_progress.current_segment;
                tree_progress.finished_segments.push(finished);
                tree_progress.current_segment = 0;
            }
            server_state.set_tree_progress(Some(tree_progress.clone()));
            // The first tree's C: adaptive clipping's current one, else the manifest's.
            let clip_norm = clipper
                .as_ref()
                .map_or(manifest.clip_norm, QuantileClipper::clip_norm);
            let mut state = TreeState {
                accountant,
                progress: tree_progress,
                tree: FtrlTree::new(
                    accountant.noise_multiplier(),
                    clip_norm,
                    dimension,
                    accountant.schedule(),
                )
                .map_err(|e| e.to_string()),
                epsilon: 0.0,
            };
            let rho = tree_rho(
                &accountant,
                &state.segments_with(0),
                manifest.bit_noise_std(),
            );
            state.epsilon =
                epsilon_from_zcdp_gaussian(rho, manifest.budget.delta).unwrap_or(f64::INFINITY);
            state
        });
        let distributed = manifest.distributed_plan().map(|plan| {
            let curve = plan.mechanism.rdp_curve(&orders);
            let mut accountant = RdpAccountant::new(orders.clone());
            let max_participations = manifest.participation.map(|l| l.max_participations());
            let composed = max_participations.map_or(rounds_committed, |k| k.min(rounds_committed));
            if composed > 0 {
                accountant.compose_rdp(&curve, composed).expect("same grid");
            }
            DistributedAccounting {
                plan,
                curve,
                accountant,
                max_participations,
                composed,
            }
        });
        if distributed.as_ref().is_some_and(|d| {
            DistributedAccounting::epsilon_of(&d.accountant, manifest.budget.delta)
                > manifest.budget.epsilon
        }) {
            overspent = true;
        }
        // As for the RDP budget above: a replay that does not fit must not go on.
        if tree
            .as_ref()
            .is_some_and(|t| t.epsilon > manifest.budget.epsilon)
        {
            overspent = true;
        }
        let mut accounting = Self {
            budget_epsilon: manifest.budget.epsilon,
            delta: manifest.budget.delta,
            assumption: manifest.epsilon_assumption(),
            bit_noise_std: manifest.bit_noise_std(),
            manifest_clip_norm: manifest.clip_norm,
            local_mode: manifest.privacy_mode == ManifestPrivacyMode::Local,
            dimension,
            release,
            budget_release,
            orders,
            accountant,
            budget,
            cumulative,
            releases,
            pld: RepeatedReleases::new(),
            stated: vec![],
            limits: manifest.participation,
            participation: HashMap::new(),
            tree,
            clipper,
            distributed,
            overspent,
        };
        if accounting.states_pld() {
            accounting.refresh_stated();
            // As for RDP: a replay past the budget must not go on.
            if accounting.budget_epsilon_after(0) > accounting.budget_epsilon {
                accounting.overspent = true;
            }
        }
        accounting
    }

    /// Whether the per-round releases are accounted by PLD (with the run's accountant PLD and
    /// a per-round release: not DP-FTRL, not distributed, not without DP).
    fn states_pld(&self) -> bool {
        self.accountant == Accountant::Pld && self.release.is_some()
    }

    /// The accountant that computes the run's ε (RDP for DP-FTRL and distributed mode, where
    /// PLD does not apply); `None` without DP.
    pub fn accountant(&self) -> Option<Accountant> {
        if self.distributed.is_some() || self.tree.is_some() {
            return Some(Accountant::Rdp);
        }
        self.release.map(|_| self.accountant)
    }

    /// The effective σ of the per-round release (noise std over the L2 sensitivity).
    fn effective_noise_multiplier(&self) -> f64 {
        let release = self
            .release
            .expect("only asked of runs with a per-round release");
        release
            .mode
            .effective_noise_multiplier(release.noise_multiplier)
    }

    /// PLD's ε at the run's δ after `releases` per-round releases at sampling rate q.
    fn pld_epsilon(&mut self, sampling_rate: f64, releases: u64) -> f64 {
        let sigma = self.effective_noise_multiplier();
        self.pld
            .epsilon(sampling_rate, sigma, releases, self.delta)
            .unwrap_or(f64::INFINITY)
    }

    /// Recomputes the PLD statement per audience after the releases so far.
    fn refresh_stated(&mut self) {
        let rates: Vec<(Audience, f64)> =
            tracked_audiences(&self.release.expect("checked by states_pld"));
        self.stated = rates
            .into_iter()
            .map(|(audience, q)| AudienceEpsilon {
                audience: audience.as_str().to_string(),
                epsilon: self.pld_epsilon(q, self.releases),
                accountant: Some(Accountant::Pld),
            })
            .collect();
    }

    /// The ε of the audience the budget binds after `extra` more per-round releases, by the
    /// run's accountant.
    fn budget_epsilon_after(&mut self, extra: u64) -> f64 {
        match &self.budget {
            Some(PlainBudget::Pld { sampling_rate }) => {
                let q = *sampling_rate;
                self.pld_epsilon(q, self.releases + extra)
            }
            Some(PlainBudget::Rdp(budget)) if extra == 0 => budget.spent().epsilon,
            Some(PlainBudget::Rdp(budget)) => match &self.budget_release {
                Some(release) if budget.would_exceed(release).unwrap_or(true) => f64::INFINITY,
                _ => 0.0,
            },
            None => 0.0,
        }
    }

    /// Spends one per-round release: from the budget (refused, with nothing spent, if it
    /// would take the bound audience's ε past it) and in every audience's accountant.
    fn spend_plain_release(&mut self) -> Result<(), String> {
        match &mut self.budget {
            Some(PlainBudget::Rdp(budget)) => {
                if let Some(release) = &self.budget_release {
                    budget.spend(release).map_err(|e| e.to_string())?;
                }
            }
            Some(PlainBudget::Pld { .. }) => {
                let would_be = self.budget_epsilon_after(1);
                if would_be > self.budget_epsilon {
                    return Err(PrivacyError::BudgetExceeded {
                        would_be,
                        budget: self.budget_epsilon,
                        delta: self.delta,
                    }
                    .to_string());
                }
            }
            None => {}
        }
        if let Some(release) = self.release {
            let increments = round_increments(&release, &self.orders);
            for ((_, acc), inc) in self.cumulative.iter_mut().zip(&increments) {
                acc.compose_rdp(&inc.rdp, 1).expect("same grid");
            }
            self.releases += 1;
            if self.states_pld() {
                self.refresh_stated();
            }
        }
        Ok(())
    }

    /// Whether the spend restored (or re-read with [`Self::restore_releases`]) does not fit
    /// the budget: the run must stop.
    pub fn overspent(&self) -> bool {
        self.overspent
    }

    /// Loads the participation history: `committed_rounds` are the run's committed round
    /// numbers in order (a round's position is its release index), and `by_device` the round
    /// numbers each device took part in. Rounds not in `committed_rounds` count at the index
    /// the next committed round takes (a distributed release recorded just before a crash).
    pub fn restore_participations(
        &mut self,
        committed_rounds: &[u64],
        by_device: &[(String, Vec<u64>)],
    ) {
        let index: HashMap<u64, u64> = committed_rounds
            .iter()
            .enumerate()
            .map(|(i, r)| (*r, i as u64 + 1))
            .collect();
        for (device, rounds) in by_device {
            let releases: Vec<u64> = rounds
                .iter()
                .map(|r| {
                    index.get(r).copied().unwrap_or_else(|| {
                        committed_rounds.iter().filter(|c| *c < r).count() as u64 + 1
                    })
                })
                .collect();
            if releases.is_empty() {
                continue;
            }
            self.participation.insert(
                device.clone(),
                Participation {
                    last: releases.iter().max().copied(),
                    count: releases.len() as u64,
                },
            );
        }
    }

    /// Distributed mode: rebuilds the accountant from the number of releases the store
    /// recorded (committed or not). `cap_recorded`: whether `run_created` names the
    /// participation limits (a run created before they bounded the ε composes every
    /// release). Marks the accounting overspent when the releases do not fit the budget.
    pub fn restore_releases(&mut self, released: u64, cap_recorded: bool) {
        let Some(d) = self.distributed.as_mut() else {
            return;
        };
        if !cap_recorded {
            d.max_participations = None;
        }
        let composed = d.max_participations.map_or(released, |k| k.min(released));
        let mut accountant = RdpAccountant::new(d.accountant.orders().clone());
        if composed > 0 && accountant.compose_rdp(&d.curve, composed).is_err() {
            self.overspent = true;
            return;
        }
        d.accountant = accountant;
        d.composed = composed;
        if DistributedAccounting::epsilon_of(&d.accountant, self.delta) > self.budget_epsilon {
            self.overspent = true;
        }
    }

    /// The participation limits in force, if any.
    pub fn participation_limits(&self) -> Option<ParticipationLimits> {
        self.limits
    }

    /// Why the participation limits refuse `device` a task in release `release` (the next
    /// committed round's index), or `None` if they allow it (or there are none).
    pub fn limit_refusal(&self, device: &str, release: u64) -> Option<LimitRefusal> {
        let limits = self.limits?;
        let p = self.participation.get(device).copied().unwrap_or_default();
        (!limits.allows(p.last, p.count, release)).then(|| LimitRefusal {
            next_allowed: limits.next_allowed_round(p.last, p.count),
            count: p.count,
            min_separation: limits.min_separation(),
        })
    }

    /// Counts one release (index `release`) for each of `devices`.
    fn record_participations(&mut self, devices: &[String], release: u64) {
        for device in devices {
            let p = self.participation.entry(device.clone()).or_default();
            p.last = Some(release);
            p.count += 1;
        }
    }

    /// The clip norm C the next round uses: DP-FTRL's current tree's (a node's noise is drawn
    /// for one C, so C changes only with a new tree), else adaptive clipping's current one,
    /// else the manifest's. The only place the engine reads C from.
    pub fn clip_norm(&self) -> f64 {
        match (&self.tree, &self.clipper) {
            (Some(t), _) => t
                .tree
                .as_ref()
                .map_or(self.manifest_clip_norm, FtrlTree::clip_norm),
            (None, Some(c)) => c.clip_norm(),
            (None, None) => self.manifest_clip_norm,
        }
    }

    /// Adaptive clipping's C before each update so far in this process.
    pub fn clip_trajectory(&self) -> Option<&[f64]> {
        self.clipper.as_ref().map(QuantileClipper::trajectory)
    }

    /// Adaptive clipping for a round about to open: the coordinator's bit sum (central
    /// bits), the C the bits are computed against (the clipper's current C), and the sum of
    /// the devices' bits (local bits). Without adaptive clipping: nothing, against `C`.
    pub(crate) fn begin_bits(&self, local_bits: bool) -> (Option<ClippedSum>, f64, Option<f64>) {
        let (bits, bit_clip_norm) = match &self.clipper {
            Some(c) if !local_bits => (c.begin_bits().ok(), c.clip_norm()),
            Some(c) => (None, c.clip_norm()),
            None => (None, self.clip_norm()),
        };
        let device_bits = (local_bits && self.clipper.is_some()).then_some(0.0);
        (bits, bit_clip_norm, device_bits)
    }

    /// Cumulative ε per tracked audience at the run's δ.
    pub fn spent(&self) -> Vec<AudienceEpsilon> {
        if let Some(d) = &self.distributed {
            return vec![AudienceEpsilon {
                audience: Audience::ReleaseObservers.as_str().to_string(),
                epsilon: DistributedAccounting::epsilon_of(&d.accountant, self.delta),
                accountant: Some(Accountant::Rdp),
            }];
        }
        if let Some(t) = &self.tree {
            return vec![AudienceEpsilon {
                audience: Audience::ReleaseObservers.as_str().to_string(),
                epsilon: t.epsilon,
                accountant: Some(Accountant::Rdp),
            }];
        }
        if self.states_pld() {
            return self.stated.clone();
        }
        self.cumulative
            .iter()
            .map(|(a, acc)| AudienceEpsilon {
                audience: a.as_str().to_string(),
                epsilon: acc
                    .epsilon(self.delta)
                    .map(|e| e.epsilon)
                    .unwrap_or(f64::INFINITY),
                accountant: Some(Accountant::Rdp),
            })
            .collect()
    }

    /// Checks, before a round opens, that its release fits the budget (per round, as a
    /// distributed release, or in DP-FTRL's tree accounting) and that a distributed run has
    /// its plan. `Err` is the reason the run stops instead.
    pub fn check_next_round(&mut self, manifest: &RunManifest) -> Result<(), String> {
        if self.budget.is_some() && self.budget_epsilon_after(1) > self.budget_epsilon {
            return Err(format!(
                "budget exhausted: one more round would exceed ε = {} at δ = {} by the {} accountant",
                self.budget_epsilon, self.delta, self.accountant
            ));
        }
        if manifest.privacy_mode == ManifestPrivacyMode::Distributed && self.distributed.is_none() {
            // Validated manifests always have a plan; without one no round may open, since
            // it would be a plain round with neither masking nor a budget check.
            let why = match crate::distributed::plan(manifest) {
                Err(e) => format!("{} = {}: {}", e.key, e.value, e.reason),
                Ok(_) => "the plan was not available when the run was loaded".into(),
            };
            return Err(format!(
                "privacy_mode = \"distributed\" without a valid plan: {why}"
            ));
        }
        if let Some(d) = &self.distributed
            && d.next_epsilon(self.delta) > self.budget_epsilon
        {
            return Err(format!(
                "budget exhausted: one more round would exceed ε = {} at δ = {} by the rdp accountant ({})",
                self.budget_epsilon, self.delta, self.assumption
            ));
        }
        if let Some(t) = &self.tree {
            let rho = tree_rho(&t.accountant, &t.segments_with(1), self.bit_noise_std);
            let next = epsilon_from_zcdp_gaussian(rho, self.delta).unwrap_or(f64::INFINITY);
            if next > self.budget_epsilon {
                return Err(format!(
                    "budget exhausted: one more round would exceed ε = {} at δ = {} by the rdp accountant (tree accounting under {})",
                    self.budget_epsilon, self.delta, self.assumption
                ));
            }
        }
        Ok(())
    }

    /// Local mode with per-round accounting: every upload is a release to the coordinator,
    /// so a round is charged when its first update arrives.
    pub fn charges_local_rounds(&self) -> bool {
        self.local_mode && self.release.is_some()
    }

    /// Charges one local round: spends its release from the budget and adds it to every
    /// audience. Returns the round's increments and the cumulative ε after it; `Err` (the
    /// budget's refusal) spends nothing.
    pub(crate) fn charge_local(
        &mut self,
    ) -> Result<(Vec<AudienceRdp>, Vec<AudienceEpsilon>), String> {
        let release = self.release.expect("checked by charges_local_rounds");
        self.spend_plain_release()?;
        Ok((round_increments(&release, &self.orders), self.spent()))
    }

    /// Distributed mode, right before a sum is unmasked: whether one more release fits the
    /// budget (`Err` says why not).
    pub(crate) fn may_release_distributed(&self) -> Result<(), String> {
        match &self.distributed {
            Some(d) if d.next_epsilon(self.delta) <= self.budget_epsilon => Ok(()),
            Some(_) => Err(format!(
                "refused by the budget before unmasking: the round would take ε past {}",
                self.budget_epsilon
            )),
            None => Err("no distributed accounting for this run".into()),
        }
    }

    /// Distributed mode: spends one release of the sum of `participants`' inputs (release
    /// index `release`), counting it towards each one's limits whether or not the round later
    /// commits. Returns the release's increments. Only after
    /// [`Self::may_release_distributed`] said yes.
    pub(crate) fn release_distributed(
        &mut self,
        participants: &[String],
        release: u64,
    ) -> Vec<AudienceRdp> {
        let Some(d) = self.distributed.as_mut() else {
            unreachable!("may_release_distributed refuses a run without distributed accounting");
        };
        let Some(next) = d.after_one_more() else {
            unreachable!(
                "may_release_distributed checked that one more round composes within the budget"
            );
        };
        d.adopt(next);
        let increments = d.increments();
        self.record_participations(participants, release);
        increments
    }

    /// Whether the run is in distributed mode with its plan.
    pub fn is_distributed(&self) -> bool {
        self.distributed.is_some()
    }

    /// Distributed mode: the plan every round uses.
    pub(crate) fn distributed_plan(&self) -> Option<&DistributedPlan> {
        self.distributed.as_ref().map(|d| &d.plan)
    }

    /// DP-FTRL: the current segment's tree, or why it is unavailable (`None`: not dp-ftrl).
    pub(crate) fn ftrl_tree(&mut self) -> Option<Result<&mut FtrlTree, &str>> {
        self.tree
            .as_mut()
            .map(|t| t.tree.as_mut().map_err(|e| e.as_str()))
    }

    /// DP-FTRL: the current tree may hold a round that failed after it took its sum; no
    /// later round may be released from it.
    pub(crate) fn retire_tree(&mut self, reason: &str) {
        if let Some(t) = self.tree.as_mut() {
            t.tree = Err(format!("stopped after a failed round: {reason}"));
        }
    }

    /// Whether the run uses DP-FTRL.
    pub(crate) fn is_tree(&self) -> bool {
        self.tree.is_some()
    }

    /// Commits round `round`'s spend, plain or distributed, after its aggregate was taken by
    /// the server optimiser: spends a plain round's release (unless it was charged), releases
    /// adaptive clipping's bits and moves C, advances DP-FTRL's segment (updating
    /// `server_state`), and counts the contributors' participations at release index
    /// `release` (a distributed round's were counted at its release). `Err`: the budget
    /// refused a plain round, and nothing was spent.
    pub(crate) fn commit<S: GaussianSampler>(
        &mut self,
        spend: CommitSpend,
        round: u64,
        participants: &[String],
        release: u64,
        server_state: &mut ServerState,
        sampler: Option<&mut S>,
    ) -> Result<CommittedSpend, String> {
        let (charged, bits, device_bits) = match spend {
            CommitSpend::Distributed(record) => {
                // The release was spent and recorded before the sum was unmasked.
                return Ok(CommittedSpend {
                    rdp_increments: self
                        .distributed
                        .as_ref()
                        .map(DistributedAccounting::increments)
                        .unwrap_or_else(|| {
                            vec![AudienceRdp {
                                audience: Audience::ReleaseObservers.as_str().to_string(),
                                sampling_rate: 1.0,
                                rdp: vec![],
                            }]
                        }),
                    tree: None,
                    next_clip_norm: None,
                    epsilon_assumption: Some(self.assumption.clone()),
                    distributed: Some(record),
                });
            }
            CommitSpend::Plain {
                charged,
                bits,
                device_bits,
            } => (charged, bits, device_bits),
        };
        // A charged round's spend is in the run's ε already. The budget was checked when the
        // round opened; a refusal here means the manifest changed under us.
        if !charged {
            self.spend_plain_release()
                .map_err(|e| format!("refused by the budget: {e}"))?;
        }
        let increments = self
            .release
            .map(|r| round_increments(&r, &self.orders))
            .unwrap_or_default();
        // Adaptive clipping: the bits are released with the round (their cost is in the
        // accounting of the committed round), and C moves.
        if let (Some(clipper), Some(bits), Some(sampler)) = (self.clipper.as_mut(), bits, sampler)
            && let Err(e) = clipper.release_and_update(bits, sampler)
        {
            // Only a lattice overflow can fail here, which σ_b rules out; C then stays.
            tracing::warn!(round, error = %e, "clip bits not released; C unchanged");
        }
        // Local mode: the devices' noised bits are already released; C moves with their sum.
        if let (Some(clipper), Some(sum)) = (self.clipper.as_mut(), device_bits)
            && let Err(e) = clipper.update(sum)
        {
            // The sum of finite bits is finite; C then stays.
            tracing::warn!(round, error = %e, "clip bits not usable; C unchanged");
        }
        let mut tree_record = None;
        if let Some(t) = self.tree.as_mut() {
            t.progress.current_segment += 1;
            let segments = t.segments_with(0);
            let rho = tree_rho(&t.accountant, &segments, self.bit_noise_std);
            t.epsilon = epsilon_from_zcdp_gaussian(rho, self.delta).unwrap_or(f64::INFINITY);
            let schedule = t.accountant.schedule();
            let limits = t.accountant.limits();
            tree_record = Some(TreeRound {
                restart_every: schedule.rounds_per_tree(),
                completion: schedule.completion(),
                min_separation: limits.min_separation(),
                max_participations: limits.max_participations(),
                segment: t.progress.finished_segments.len() as u64,
                segment_round: t.progress.current_segment,
                bit_noise_std: self.bit_noise_std,
                rho,
            });
            server_state.set_tree_progress(Some(t.progress.clone()));
            // A new C takes effect only with a new tree (a node's noise is drawn for one C).
            if let (Some(clipper), Ok(tree)) = (&self.clipper, &t.tree)
                && tree.at_tree_boundary()
                && clipper.clip_norm() != tree.clip_norm()
            {
                t.tree = FtrlTree::new(
                    t.accountant.noise_multiplier(),
                    clipper.clip_norm(),
                    self.dimension,
                    schedule,
                )
                .map_err(|e| e.to_string());
            }
        }
        if let Some(clipper) = &self.clipper {
            server_state.set_clip_norm(Some(clipper.clip_norm()));
        }
        self.record_participations(participants, release);
        Ok(CommittedSpend {
            rdp_increments: increments,
            epsilon_assumption: (tree_record.is_some() || self.clipper.is_some())
                .then(|| self.assumption.clone()),
            tree: tree_record,
            next_clip_norm: self.clipper.as_ref().map(|_| self.clip_norm()),
            distributed: None,
        })
    }
}

/// What a run's ledger says was spent, read off its entries: what [`RunAccounting::restore`]
/// rebuilds the spend from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LedgerSpend {
    /// Rounds committed.
    pub committed: u64,
    /// Local rounds charged that did not commit (abandoned, or still open).
    pub uncommitted_charges: u64,
    /// The charged round still open (neither committed nor abandoned), if any.
    pub open_charge: Option<u64>,
}

impl LedgerSpend {
    /// Reads the spend off a run's entries, in sequence order: every committed round, and
    /// every charged round that did not commit.
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = &'a LedgerEntry>) -> Self {
        let mut spend = Self::default();
        for entry in entries {
            match entry.event {
                LedgerEvent::RoundCharged { round, .. } => {
                    spend.uncommitted_charges += 1;
                    spend.open_charge = Some(round);
                }
                LedgerEvent::RoundCommitted { round, .. } => {
                    spend.committed += 1;
                    if spend.open_charge.take() == Some(round) {
                        spend.uncommitted_charges -= 1;
                    }
                }
                LedgerEvent::RoundAbandoned { round, .. } if spend.open_charge == Some(round) => {
                    spend.open_charge = None;
                }
                _ => {}
            }
        }
        spend
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregation::ServerState;
    use crate::manifest::tests::EXAMPLE;

    fn manifest(text: &str) -> RunManifest {
        RunManifest::from_toml(text, "m.toml").unwrap()
    }

    fn restored(m: &RunManifest, committed: u64, charged: u64) -> RunAccounting {
        let mut state = ServerState::new(&m.server_optimizer, m.dimension());
        RunAccounting::restore(m, committed, charged, &mut state, m.dimension())
    }

    fn entry(sequence: u64, event: LedgerEvent) -> LedgerEntry {
        LedgerEntry {
            run_id: "r".into(),
            sequence,
            at_ms: 0,
            event,
        }
    }

    fn charged(round: u64) -> LedgerEvent {
        LedgerEvent::RoundCharged {
            round,
            noise_multiplier: 1.0,
            mode: "local".into(),
            rdp_increments: vec![],
            cumulative_epsilon: vec![],
        }
    }

    fn committed(round: u64) -> LedgerEvent {
        LedgerEvent::RoundCommitted {
            round,
            cohort_size: 2,
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            mode: "local".into(),
            rdp_increments: vec![],
            cumulative_epsilon: vec![],
            model_version: round + 1,
            model_sha256: String::new(),
            tree: None,
            next_clip_norm: None,
            epsilon_assumption: None,
            distributed: None,
        }
    }

    fn abandoned(round: u64) -> LedgerEvent {
        LedgerEvent::RoundAbandoned {
            round,
            contributions: 0,
            reason: "test".into(),
        }
    }

    #[test]
    fn ledger_spend_counts_commits_and_charges_that_did_not_commit() {
        let entries: Vec<LedgerEntry> = [
            charged(1),
            committed(1),
            charged(2),
            abandoned(2),
            committed(3),
            charged(4),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, e)| entry(i as u64 + 2, e))
        .collect();
        let spend = LedgerSpend::from_entries(&entries);
        assert_eq!(
            spend,
            LedgerSpend {
                committed: 2,
                uncommitted_charges: 2,
                open_charge: Some(4),
            }
        );
        assert_eq!(LedgerSpend::from_entries(&[]), LedgerSpend::default());
    }

    #[test]
    fn restored_spend_states_the_same_epsilon_as_spending_round_by_round() {
        let m = manifest(EXAMPLE);
        let mut live = restored(&m, 0, 0);
        let mut state = ServerState::new(&m.server_optimizer, m.dimension());
        for round in 1..=3 {
            live.check_next_round(&m).unwrap();
            live.commit(
                CommitSpend::Plain {
                    charged: false,
                    bits: None,
                    device_bits: None,
                },
                round,
                &["a".to_string()],
                round,
                &mut state,
                None::<&mut fedpref_privacy::SecureSampler>,
            )
            .unwrap();
        }
        let again = restored(&m, 3, 0);
        assert_eq!(live.spent(), again.spent());
        assert!(live.spent()[0].epsilon > 0.0);
        assert!(!again.overspent());
    }

    #[test]
    fn a_round_past_the_budget_is_refused_before_it_opens_and_a_replay_past_it_is_overspent() {
        let tight = EXAMPLE.replace("epsilon = 10.0", "epsilon = 1.0");
        let m = manifest(&tight);
        let mut fresh = restored(&m, 0, 0);
        let reason = fresh.check_next_round(&m).unwrap_err();
        assert!(reason.starts_with("budget exhausted"), "{reason}");
        assert!(restored(&m, 3, 0).overspent());
    }

    #[test]
    fn the_clip_norm_is_the_manifests_without_adaptive_clipping_or_a_tree() {
        let m = manifest(&EXAMPLE.replace("clip_norm = 1.0", "clip_norm = 0.5"));
        let a = restored(&m, 0, 0);
        assert_eq!(a.clip_norm(), 0.5);
        assert_eq!(a.clip_trajectory(), None);
        assert_eq!(a.begin_bits(false), (None, 0.5, None));
    }
}
