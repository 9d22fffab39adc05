//! The report's words: [`ImpactReport::document`] writes every heading, sentence, list and
//! table of the report once, for both the Markdown and the HTML rendering.

use fedpref_privacy::evaluation::COORDINATES;

use super::charts::{epsilon_chart, histogram_chart, trim_num};
use super::document::{
    Block, Column, Document, Field, Inline, Item, Table, cell, code, column, heading, list,
    paragraph, strong, text,
};
use super::{Alert, EvaluationSpend, Guardrails, ImpactReport, PerDevice, eps, utc};
use crate::guardrail::MINIMUM_DEVICES_SHOWN;
use crate::manifest::GuardrailMetricKind;

impl ImpactReport {
    /// The report as a document, which [`Self::to_markdown`] and [`Self::to_html`] render.
    pub fn document(&self) -> Document {
        let mut blocks = self.header();
        blocks.extend(self.promised());
        blocks.extend(self.spent());
        blocks.extend(self.guardrail_blocks());
        blocks.extend(self.operation_blocks());
        blocks.push(Block::Footer {
            heading: "How to re-derive these numbers".into(),
            blocks: vec![list(self.rederive())],
        });
        Document {
            title: format!("Impact report: {}", self.title),
            banner: self.banner(),
            blocks,
        }
    }

    fn banner(&self) -> Vec<Block> {
        if self.ledger.intact {
            return vec![];
        }
        vec![Block::Callout {
            inlines: vec![
                Inline::Strong(vec![
                    text(format!(
                        "LEDGER CHAIN BROKEN at entry {}: ",
                        self.ledger.failed_sequence.unwrap_or(0)
                    )),
                    text(self.ledger.problem.as_deref().unwrap_or("unknown problem")),
                    text("."),
                ]),
                text(
                    " The figures below are read from the entries as stored and cannot be trusted until the ledger is restored from a copy whose head hash was recorded.",
                ),
            ],
            class: "broken",
            id: "ledger-broken",
        }]
    }

    fn header(&self) -> Vec<Block> {
        let l = &self.ledger;
        let mut ledger = vec![
            text("Ledger: "),
            if l.intact {
                Inline::Status {
                    ok: true,
                    text: "chain intact, totals re-derived".into(),
                }
            } else {
                Inline::Status {
                    ok: false,
                    text: "CHAIN BROKEN".into(),
                }
            },
            text(format!(
                " · {} entries · head entry {} · head SHA-256 ",
                l.entries, l.head_sequence
            )),
            Inline::Hash(l.head_sha256.clone()),
            text(" · "),
        ];
        match &l.public_key {
            Some(k) => ledger.extend([text("signed by ledger key "), Inline::Hash(k.clone())]),
            None => ledger.push(text("head not signed")),
        }
        vec![
            Block::Paragraph {
                inlines: vec![
                    text("Run "),
                    code(&self.run_id),
                    text(" · status "),
                    strong(&self.status),
                    text(" · generated "),
                    text(utc(self.generated_at_ms)),
                ],
                class: Some("meta"),
            },
            paragraph(ledger),
        ]
    }

    fn promised(&self) -> Vec<Block> {
        let a = &self.assessment;
        let field = |label, value| Field {
            label,
            value,
            notes: vec![],
        };
        let p = &a.opt_out_policy;
        let mut consent = vec![text(&p.consent_model)];
        if !p.description.is_empty() {
            consent.extend([text(" — "), text(&p.description)]);
        }
        if !p.withdrawal_effect.is_empty() {
            consent.extend([text(" · Withdrawal: "), text(&p.withdrawal_effect)]);
        }
        let fields = vec![
            field("Purpose", vec![text(&a.purpose)]),
            field("Owner", vec![text(&a.owner)]),
            field("Data used", vec![text(list_or_none(&a.data_elements_used))]),
            field(
                "Data deliberately not used",
                vec![text(list_or_none(&a.data_elements_not_used))],
            ),
            Field {
                label: "Privacy mode",
                value: vec![
                    text(format!("{} — ", a.privacy_mode)),
                    text(&a.mode_explained),
                ],
                notes: a
                    .audiences
                    .iter()
                    .map(|n| {
                        vec![
                            text("ε for "),
                            code(&n.audience),
                            text(format!(" {}", n.description)),
                        ]
                    })
                    .collect(),
            },
            field(
                "The budget binds",
                vec![text("the ε for "), code(&a.budget_audience)],
            ),
            field("One user is", vec![text(&a.unit_of_privacy)]),
            field(
                "Budget",
                vec![text(format!(
                    "ε = {} at δ = {:e} · clip norm C = {} · noise multiplier σ = {}",
                    a.budget_epsilon,
                    a.budget_delta,
                    a.clip_norm,
                    a.noise_multiplier
                        .map(|s| format!("{s:.6}"))
                        .unwrap_or_else(|| "none".into())
                ))],
            ),
            field(
                "Sampling",
                vec![
                    text(&a.sampling),
                    text(format!(
                        " (accounting rate q = {}) · {} rounds planned",
                        a.sampling_rate, a.rounds_planned
                    )),
                ],
            ),
            field("The headline ε rests on", vec![text(&a.epsilon_assumption)]),
            field(
                "Every ε is computed by",
                vec![text(&a.accountant_explained)],
            ),
            field("Consent", consent),
            field(
                "Manifest SHA-256",
                vec![Inline::Hash(a.manifest_sha256.clone())],
            ),
        ];
        let none = || paragraph(vec![text("None recorded in the manifest.")]);
        let harms = if a.harm_scenarios.is_empty() {
            none()
        } else {
            Block::Table(Table {
                columns: ["scenario", "affected", "mitigation", "residual risk"]
                    .map(|h| column(h, false))
                    .into(),
                rows: a
                    .harm_scenarios
                    .iter()
                    .map(|h| {
                        [
                            &h.scenario,
                            &h.affected_groups,
                            &h.mitigation,
                            &h.residual_risk,
                        ]
                        .map(|s| cell(or_dash(s)))
                        .into()
                    })
                    .collect(),
            })
        };
        let kpis = if a.kpis.is_empty() {
            none()
        } else {
            Block::Table(Table {
                columns: vec![
                    column("KPI", false),
                    column("description", false),
                    column("target", true),
                    column("better", false),
                ],
                rows: a
                    .kpis
                    .iter()
                    .map(|k| {
                        vec![
                            cell(or_dash(&k.metric)),
                            cell(or_dash(&k.description)),
                            cell(k.target.map_or_else(|| "—".into(), |t| t.to_string())),
                            cell(if k.higher_is_better {
                                "higher"
                            } else {
                                "lower"
                            }),
                        ]
                    })
                    .collect(),
            })
        };
        vec![
            heading(2, "What the run promised"),
            Block::Fields(fields),
            heading(3, "Harm scenarios"),
            harms,
            heading(3, "KPIs"),
            kpis,
        ]
    }

    fn spent(&self) -> Vec<Block> {
        let s = &self.spend;
        let pd = &s.per_device;
        let mut blocks = vec![
            heading(2, "What was spent"),
            paragraph(vec![text(format!(
                "{} rounds committed, {} abandoned (nothing spent); {} devices took part.",
                s.rounds_committed, s.rounds_abandoned, s.devices_participated
            ))]),
        ];
        if !s.final_epsilon.is_empty() {
            blocks.push(list(s.final_epsilon.iter().map(|f| {
                vec![
                    text("Cumulative ε for "),
                    code(&f.audience),
                    text(": "),
                    strong(eps(f.epsilon)),
                    text(format!(
                        " of the budget {} ({:.1} %) at δ = {:e}",
                        s.budget_epsilon,
                        100.0 * f.epsilon / s.budget_epsilon,
                        s.delta
                    )),
                ]
            })));
        }
        let mut series_table = vec![];
        if let Some(first) = s.series.first() {
            let mut columns = vec![column("round", true)];
            columns.extend(s.series.iter().map(|se| Column {
                header: vec![text("ε "), code(&se.audience)],
                numeric: true,
            }));
            let rows = first
                .points
                .iter()
                .enumerate()
                .skip(1)
                .map(|(i, pt)| {
                    let mut row = vec![cell(pt.round.to_string())];
                    row.extend(s.series.iter().map(|se| {
                        cell(se.points.get(i).map(|p| eps(p.epsilon)).unwrap_or_default())
                    }));
                    row
                })
                .collect();
            series_table.push(Block::Table(Table { columns, rows }));
        }
        let mut device_tables = vec![];
        if !pd.by_participations.is_empty() {
            device_tables.push(Block::Table(Table {
                columns: vec![
                    column("rounds taken part in", true),
                    column("devices", true),
                    column("ε per device", true),
                ],
                rows: pd
                    .by_participations
                    .iter()
                    .map(|g| {
                        vec![
                            cell(g.participations.to_string()),
                            cell(g.devices.to_string()),
                            cell(eps(g.epsilon)),
                        ]
                    })
                    .collect(),
            }));
            device_tables.push(Block::Table(Table {
                columns: vec![
                    column("ε from", true),
                    column("ε to", true),
                    column("devices", true),
                ],
                rows: pd
                    .histogram
                    .iter()
                    .map(|b| {
                        vec![
                            cell(eps(b.from)),
                            cell(eps(b.to)),
                            cell(b.devices.to_string()),
                        ]
                    })
                    .collect(),
            }));
        }
        blocks.push(Block::Columns(vec![
            vec![Block::Figure {
                svg: epsilon_chart(s),
                caption: None,
                fallback: series_table,
            }],
            vec![
                heading(3, "Per-device ε"),
                Block::Figure {
                    svg: histogram_chart(pd),
                    caption: Some(vec![text(per_device_sentence(pd, s.delta))]),
                    fallback: device_tables,
                },
            ],
        ]));
        if !s.clip_trajectory.is_empty() {
            blocks.extend([
                heading(3, "Adaptive clipping"),
                paragraph(vec![text(clip_bits_sentence(
                    &self.assessment.privacy_mode,
                ))]),
                Block::Table(Table {
                    columns: ["round", "C", "next C"].map(|h| column(h, false)).into(),
                    rows: s
                        .clip_trajectory
                        .iter()
                        .map(|c| {
                            vec![
                                cell(c.round.to_string()),
                                cell(trim_num(c.clip_norm)),
                                cell(trim_num(c.next_clip_norm)),
                            ]
                        })
                        .collect(),
                }),
            ]);
        }
        blocks
    }

    fn guardrail_blocks(&self) -> Vec<Block> {
        let g = &self.guardrails;
        let mut blocks = vec![
            heading(2, "Guardrails"),
            paragraph(vec![text(guardrail_intro(g))]),
        ];
        if !g.thresholds.is_empty() {
            blocks.push(Block::Table(Table {
                columns: vec![
                    column("metric", false),
                    column("alert when", false),
                    column("on alert", false),
                    column("minimum devices", true),
                    column("latest value", true),
                ],
                rows: g
                    .thresholds
                    .iter()
                    .map(|t| {
                        vec![
                            vec![
                                text(t.metric.as_str()),
                                Inline::Note(t.metric.describe().into()),
                            ],
                            cell(format!("{} {}", t.direction.as_str(), t.threshold)),
                            cell(t.on_alert.as_str()),
                            cell(t.minimum_reporting_devices.to_string()),
                            cell(latest_value(g, t.metric)),
                        ]
                    })
                    .collect(),
            }));
        }
        if !g.versions.is_empty() {
            let mut columns = vec![
                column("model version", true),
                column("devices", true),
                column("reports", true),
            ];
            columns.extend(GuardrailMetricKind::ALL.iter().map(|k| Column {
                header: vec![Inline::Ident(k.as_str().into())],
                numeric: true,
            }));
            let rows = g
                .versions
                .iter()
                .map(|v| {
                    let mut row = vec![
                        cell(v.model_version.to_string()),
                        cell(v.reporting_devices.to_string()),
                        cell(v.reports.to_string()),
                    ];
                    row.extend(GuardrailMetricKind::ALL.iter().map(|k| {
                        cell(
                            v.values
                                .get(k)
                                .map_or_else(|| "—".into(), |x| metric_value(*x)),
                        )
                    }));
                    row
                })
                .collect();
            blocks.push(Block::Table(Table { columns, rows }));
        }
        if !g.evaluation.is_empty() {
            blocks.push(list(
                g.evaluation
                    .iter()
                    .map(|e| vec![text(evaluation_sentence(e))]),
            ));
        }
        blocks.push(heading(3, "Alerts"));
        blocks.push(if g.alerts.is_empty() {
            paragraph(vec![text("No guardrail alert fired.")])
        } else {
            Block::List(
                g.alerts
                    .iter()
                    .map(|a| Item {
                        inlines: vec![text(alert_sentence(a))],
                        class: Some("alert"),
                        children: vec![],
                    })
                    .collect(),
            )
        });
        blocks
    }

    fn operation_blocks(&self) -> Vec<Block> {
        vec![
            heading(2, "Operations"),
            if self.operations.is_empty() {
                paragraph(vec![text("No pause, resumption, rollback or stop.")])
            } else {
                list(self.operations.iter().map(|op| {
                    vec![
                        text(format!("entry {} ({}): ", op.sequence, utc(op.at_ms))),
                        text(&op.detail),
                    ]
                }))
            },
        ]
    }

    /// How a reader re-derives every number, one item per command.
    fn rederive(&self) -> Vec<Vec<Inline>> {
        let run_id = &self.run_id;
        let mut items = vec![
            vec![
                code(format!(
                    "fedpref-coordinator ledger verify --db PATH --run {run_id}"
                )),
                text(
                    " recomputes the hash chain and re-derives every round's RDP increments and the cumulative ε per audience from the recorded σ, q and mode; its head hash must equal the one printed at the top of this report.",
                ),
            ],
            vec![
                code(format!(
                    "fedpref-coordinator ledger export --db PATH --run {run_id} --format json"
                )),
                text(
                    " prints every entry with its canonical text, previous hash and hash (documented field by field in docs/reference/ledger-export.md): the rounds, cohort sizes, ε per round, guardrail alerts, pauses, rollbacks and the stop shown here are those entries.",
                ),
            ],
            vec![
                text(
                    "Per-device ε composes, for each device, the rounds it took part in at each round's σ without amplification by sampling (",
                ),
                code(
                    "fedpref-coordinator accountant epsilon --noise-multiplier σ --sampling-rate 1 --rounds K --delta δ",
                ),
                text(" gives the same figure for K participations at one σ)."),
            ],
            vec![text(format!(
                "Guardrail metrics are ratios of noised sums: each device releases its evaluation of a model version once, as K = {COORDINATES} rates in [0, 1] with Gaussian noise added on the device; the coordinator sums the releases and compares ratios of the noised sums with the thresholds. A version's metrics are shown only from {MINIMUM_DEVICES_SHOWN} reporting devices; no single device's release is shown or used alone."
            ))],
        ];
        if self.is_tree() {
            items.push(vec![
                text(
                    "DP-FTRL: each round's ledger entry records its tree segment, its position in it and the cumulative ρ; ",
                ),
                code("ledger verify"),
                text(
                    " re-derives ρ and ε from the tree accountant under the recorded participation limits. A device's own ε is at most the run's (the worst pattern the limits allow), which is the per-device figure shown.",
                ),
            ]);
        }
        items
    }
}

fn metric_value(v: f64) -> String {
    format!("{v:.4}")
}

/// A table cell's text, or a dash for an empty one.
fn or_dash(s: &str) -> String {
    if s.is_empty() { "—".into() } else { s.into() }
}

/// Data elements on one line, or that none were listed.
fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none listed".into()
    } else {
        v.join("; ")
    }
}

/// Where adaptive clipping's bits came from and what protects them, by privacy mode.
fn clip_bits_sentence(privacy_mode: &str) -> &'static str {
    if privacy_mode == "local" {
        "Local mode: each device computed its bit (norm before clipping at most C) and added Gaussian noise to it itself; the coordinator summed the noised bits without adding noise. Each upload's (update, bit) pair is accounted in the ε above as one local release at the combined noise multiplier (replace-one neighbours; no sampling assumption)."
    } else {
        "Central mode: the coordinator computed each update's bit, summed the bits and added Gaussian noise to the sum; the bits' cost is in the ε above."
    }
}

fn evaluation_sentence(e: &EvaluationSpend) -> String {
    format!(
        "Model version {}: each reporting device released its evaluation once, a local Gaussian release with σ = {}, ε = {:.4} at δ = {:e} on that device's own accountant (ledger entry {}).",
        e.model_version, e.noise_multiplier, e.epsilon, e.delta, e.sequence
    )
}

fn per_device_sentence(pd: &PerDevice, delta: f64) -> String {
    match pd.max_epsilon {
        None => "No device has taken part yet.".into(),
        Some(max) => format!(
            "Each device's own participations composed without amplification by sampling, at δ = {delta:e}; this {}. The largest per-device ε is {}: {} took part in {} rounds.",
            pd.holds_against,
            eps(max),
            if pd.devices_at_max == 1 {
                "the one device with it".to_string()
            } else {
                format!("each of the {} devices with it", pd.devices_at_max)
            },
            pd.max_participations,
        ),
    }
}

fn guardrail_intro(g: &Guardrails) -> String {
    if g.thresholds.is_empty() {
        "The manifest sets no guardrail thresholds.".into()
    } else {
        format!(
            "{} guardrails from the manifest, evaluated per model version over counts summed across reporting devices (aggregate counts only, and only once the minimum number of devices has reported).",
            g.thresholds.len()
        )
    }
}

fn latest_value(g: &Guardrails, k: GuardrailMetricKind) -> String {
    g.versions
        .iter()
        .rev()
        .find_map(|v| {
            v.values
                .get(&k)
                .map(|x| format!("{} (v{})", metric_value(*x), v.model_version))
        })
        .unwrap_or_else(|| "—".into())
}

fn alert_sentence(a: &Alert) -> String {
    format!(
        "entry {} ({}): {} = {} is {} the threshold {} on model version {} ({} reporting devices; a ratio of noised sums); action: {}",
        a.sequence,
        utc(a.at_ms),
        a.metric.as_str(),
        metric_value(a.value),
        a.direction.as_str(),
        a.threshold,
        a.model_version,
        a.reporting_devices,
        a.action_taken.as_str()
    )
}
