// The pack's ComfyUI settings. The frontend saves them in the user's comfy.settings.json, which
// the Face Model Loader and the training launcher read (nodes/comfy_env.py, DOWNLOAD_SETTING).
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "face_consistency.settings",
  settings: [
    {
      id: "FaceConsistency.ModelPacks.DownloadOnFirstUse",
      name: "Download standard InsightFace model packs on first use",
      category: ["Face Consistency", "Model packs", "Download on first use"],
      type: "boolean",
      defaultValue: true,
      tooltip:
        "On: a standard pack (buffalo_l, buffalo_m, buffalo_s, buffalo_sc, antelopev2) that is not in " +
        "models/insightface/models/ yet is downloaded from InsightFace's releases when a node first " +
        "needs it. Off: nothing is downloaded; the node says which zip to fetch and where to unzip it.",
    },
  ],
});
