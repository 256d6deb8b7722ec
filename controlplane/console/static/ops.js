// The rounds page's accuracy/loss chart (uPlot, vendored). Its data comes from a <script type="application/json">
// block the server rendered with |tojson: no data is ever written into JavaScript source.
(function () {
  "use strict";

  function drawChart(el) {
    var source = document.getElementById(el.getAttribute("data-ops-chart"));
    if (!source || typeof uPlot === "undefined") { return; }
    var data;
    try { data = JSON.parse(source.textContent); } catch (e) { return; }
    var width = Math.max(320, Math.min(el.clientWidth || 720, 960));
    var opts = {
      width: width,
      height: 280,
      scales: { x: { time: false }, acc: { range: [0, 1] }, loss: {} },
      axes: [
        { label: "Flower round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500] },
        { scale: "acc", label: "accuracy", values: function (u, v) { return v.map(function (x) { return (x * 100).toFixed(0) + " %"; }); } },
        { scale: "loss", label: "loss", side: 1, grid: { show: false } }
      ],
      series: [
        { label: "round" },
        { label: "accuracy", scale: "acc", stroke: "#2b7a3d", width: 2, points: { show: true },
          value: function (u, v) { return v == null ? "—" : (v * 100).toFixed(2) + " %"; } },
        { label: "loss", scale: "loss", stroke: "#b5542a", width: 2, dash: [6, 4], points: { show: true },
          value: function (u, v) { return v == null ? "—" : v.toFixed(4); } }
      ]
    };
    el.textContent = "";
    new uPlot(opts, [data.round, data.accuracy, data.loss], el);
    el.setAttribute("data-ops-drawn", "true");
  }

  function init() {
    var charts = document.querySelectorAll("[data-ops-chart]");
    for (var i = 0; i < charts.length; i++) { drawChart(charts[i]); }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
